"""Loads a kohya-format LoRA with diffusers + peft and writes the model outputs with and without it.

Runs ONLY in the interop environment (``.venv-interop``: diffusers, peft and the newer transformers they need), as a
subprocess of the tests in the WebUI-pinned ``.venv``::

    $TRAINER_INTEROP_PYTHON tests/interop/diffusers_worker.py <workdir>

Contract (DESIGN.md §4 tier 3):

Input, in ``<workdir>/``:
- ``checkpoint.safetensors``: a full ldm-layout SD1 state dict of a tiny model: ``model.diffusion_model.*`` (UNet),
  ``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.text_model.*`` (HF CLIP text model).
- ``spec.json``: ``{"unet": {in_channels, out_channels, model_channels, channel_mult, num_res_blocks,
  attention_resolutions, num_heads, num_head_channels, context_dim, transformer_depth, use_linear_in_transformer},
  "text_encoder": {hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size,
  max_position_embeddings, hidden_act}, "vae": {ch, ch_mult, num_res_blocks, z_channels}, "multiplier": float}``.
  The unet fields are the ldm ``UNetModel`` arguments (-1 = unset, as in ldm); the text_encoder fields are
  ``CLIPTextConfig`` arguments.
- ``lora.safetensors``: kohya format (``lora_unet_*`` diffusers-style stems, ``lora_te_*``; FORMATS.md §A.3).
- ``inputs.safetensors``: ``x`` [B,4,h,w] float32, ``t`` [B] int64, ``input_ids`` [B,77] int64.
- optional ``tokenizer/vocab.json`` + ``tokenizer/merges.txt`` in HF ``CLIPTokenizer`` format: merges.txt is a
  ``#version: 0.2`` line followed by exactly the vocabulary's merges (48,894 for CLIP; open_clip's raw
  ``bpe_simple_vocab_16e6.txt`` holds more lines and a different first line, which transformers >= 5 rejects).
  Without them the pipeline has no tokenizer, which neither LoRA loading nor the outputs below need.

Work: diffusers' kohya converter (``StableDiffusionPipeline.lora_state_dict``) reads the LoRA first, so a file it
rejects fails fast (it raises on any key it cannot rename). diffusers' own single-file helpers build the UNet and VAE
configs from the spec and convert the ldm weights (``create_unet_diffusers_config_from_ldm`` /
``convert_ldm_unet_checkpoint``, the VAE and CLIP equivalents); every component is loaded strictly; a
``StableDiffusionPipeline`` is assembled from them; base outputs are computed; then
``pipe.load_lora_weights(workdir, weight_name="lora.safetensors")`` and
``pipe.set_adapters(..., adapter_weights=multiplier)`` (UNet and text encoder alike), and the outputs are computed
again. Every stem of the file must have become one peft LoRA layer.

Output, in ``<workdir>/`` (all float32, on the CPU):
- ``outputs.safetensors``: ``te_base``/``te_out`` = text encoder ``last_hidden_state`` [B,77,hidden] for input_ids
  without/with the LoRA; ``unet_base``/``unet_out`` = ``unet(x, t, encoder_hidden_states=te_*).sample`` [B,4,h,w].
- ``report.json``: package versions; ``stems``: LoRA layers peft created (UNet + text encoder; the worker fails unless
  this equals the file's stem count); ``unet_lora_layers`` / ``text_encoder_lora_layers``; ``lora_file_keys`` /
  ``lora_file_stems``: counts in the file; ``lora_keys_converted``: keys in diffusers' converted state dict.

Exit status 0 on success; otherwise 1, with the traceback and a last line ``diffusers_worker: <step> failed: ...``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ADAPTER = "trainer"
VAE_SCALE_FACTOR = 0.18215  # SD1 latent scaling (v1-inference.yaml scale_factor); the VAE is not exercised


def ldm_original_config(spec: dict) -> dict:
    """The part of an ldm yaml (``model.params``) that diffusers' config builders read, from spec.json."""
    unet = {k: v for k, v in spec["unet"].items() if not (k in ("num_heads", "num_head_channels") and v == -1)}
    ddconfig = {"in_channels": 3, "out_ch": 3, "double_z": True, "attn_resolutions": [], **spec["vae"]}
    return {
        "model": {
            "params": {
                "scale_factor": VAE_SCALE_FACTOR,
                "unet_config": {"params": unet},
                "first_stage_config": {"params": {"ddconfig": ddconfig}},
            }
        }
    }


def load_strict(module, state_dict: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{what}: missing keys {missing[:5]}…, unexpected keys {unexpected[:5]}…")


def load_tokenizer(workdir: Path):
    """HF ``CLIPTokenizer`` from ``<workdir>/tokenizer/`` if present, else None."""
    from transformers import CLIPTokenizer

    directory = workdir / "tokenizer"
    if not (directory / "vocab.json").is_file():
        return None
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))


def build_pipeline(spec: dict, checkpoint: dict, tokenizer):
    """A StableDiffusionPipeline whose UNet, VAE and text encoder hold the checkpoint's weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    original = ldm_original_config(spec)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint)
    unet = UNet2DConditionModel(**unet_config)
    load_strict(unet, sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config), "UNet")

    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, checkpoint)
    vae = AutoencoderKL(**vae_config)
    load_strict(vae, sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config), "VAE")

    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
    te_weights = sfu.convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel; diffusers strips it too
        te_weights = {k.removeprefix("text_model."): v for k, v in te_weights.items()}
    expected = text_encoder.state_dict()
    te_weights = {k: v for k, v in te_weights.items() if k in expected or not k.endswith("position_ids")}
    load_strict(text_encoder, te_weights, "text encoder")

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(  # SD1's schedule (v1-inference.yaml); unused by the outputs
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def forward(pipe, inputs: dict) -> tuple:
    """(text encoder last_hidden_state, UNet sample) for the inputs, float32."""
    import torch

    with torch.no_grad():
        te = pipe.text_encoder(inputs["input_ids"]).last_hidden_state
        sample = pipe.unet(inputs["x"], inputs["t"], encoder_hidden_states=te).sample
    return te.float().contiguous(), sample.float().contiguous()


def count_lora_layers(model) -> int:
    """Modules of ``model`` into which peft injected our adapter."""
    from peft.tuners.lora import LoraLayer

    return sum(1 for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A)


def run(workdir: Path, step: list[str]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # before diffusers: its import warns about the absent torchvision
    transformers.logging.disable_progress_bar()
    import diffusers
    import peft
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    step[0] = "reading the workdir"
    spec = json.loads((workdir / "spec.json").read_text(encoding="utf-8"))
    checkpoint = load_file(str(workdir / "checkpoint.safetensors"))
    inputs = load_file(str(workdir / "inputs.safetensors"))
    lora_keys = list(load_file(str(workdir / "lora.safetensors")))
    stems = {k.split(".", 1)[0] for k in lora_keys}
    torch.manual_seed(0)

    step[0] = "converting the LoRA with diffusers (lora_state_dict)"
    converted, _alphas = StableDiffusionPipeline.lora_state_dict(str(workdir), weight_name="lora.safetensors")

    step[0] = "loading tokenizer/vocab.json + merges.txt (merges.txt: a '#version' line, then exactly the BPE merges)"
    tokenizer = load_tokenizer(workdir)

    step[0] = "building the diffusers pipeline from the ldm checkpoint"
    pipe = build_pipeline(spec, checkpoint, tokenizer)
    pipe.unet.eval()
    pipe.text_encoder.eval()

    step[0] = "computing the outputs without LoRA"
    te_base, unet_base = forward(pipe, inputs)

    step[0] = "loading the LoRA with diffusers (load_lora_weights)"
    pipe.load_lora_weights(str(workdir), weight_name="lora.safetensors", adapter_name=ADAPTER)
    pipe.set_adapters([ADAPTER], adapter_weights=[float(spec["multiplier"])])
    unet_layers, te_layers = count_lora_layers(pipe.unet), count_lora_layers(pipe.text_encoder)
    unet_stems = sum(s.startswith("lora_unet_") for s in stems)
    if (unet_layers, te_layers) != (unet_stems, len(stems) - unet_stems):
        raise RuntimeError(
            f"peft injected {unet_layers} UNet and {te_layers} text-encoder LoRA layers, but the file has "
            f"{unet_stems} UNet and {len(stems) - unet_stems} text-encoder stems: some were not applied"
        )

    step[0] = "computing the outputs with LoRA"
    te_out, unet_out = forward(pipe, inputs)

    step[0] = "writing outputs.safetensors and report.json"
    save_file(
        {"te_base": te_base, "te_out": te_out, "unet_base": unet_base, "unet_out": unet_out},
        str(workdir / "outputs.safetensors"),
    )
    report = {
        "versions": {
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "stems": unet_layers + te_layers,
        "lora_file_keys": len(lora_keys),
        "lora_file_stems": len(stems),
        "lora_keys_converted": len(converted),
        "unet_lora_layers": unet_layers,
        "text_encoder_lora_layers": te_layers,
        "multiplier": float(spec["multiplier"]),
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")


def main(argv: list[str]) -> int:
    from worker_cli import worker_main

    return worker_main("diffusers_worker", "<workdir>", run, argv, convert=lambda a: [Path(a[0])])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
