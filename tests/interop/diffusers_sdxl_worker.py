"""Loads a kohya-format SDXL LoRA with diffusers + peft into diffusers' SDXL models converted from an sgm-layout
single file, and writes the models' outputs without and with it.

Runs ONLY in the interop environment (``.venv-interop``), as a subprocess of ``tests/test_sdxl_interop.py``::

    $TRAINER_INTEROP_PYTHON tests/interop/diffusers_sdxl_worker.py <workdir>

Contract:

Input, in ``<workdir>/``:
- ``checkpoint.safetensors``: an SDXL single file (sgm keys, as the WebUI saves one): ``model.diffusion_model.*``
  (UNet), ``first_stage_model.*`` (VAE), ``conditioner.embedders.0.transformer.*`` (clip_l, HF CLIP text model),
  ``conditioner.embedders.1.model.*`` (clip_g, open_clip text tower with a fused ``in_proj``).
- ``spec.json``: ``{"unet": <sgm UNetModel arguments (-1 = unset)>, "vae": <ddconfig>, "text_encoder": <CLIPTextConfig
  arguments of clip_l>, "text_encoder_2": <CLIPTextConfig arguments of clip_g, with projection_dim>,
  "multiplier": float}``. The checkpoint is tiny, so nothing can be fetched from the hub: the configs come from here.
- ``lora.safetensors``: kohya format (``lora_unet_`` + sgm names, ``lora_te1_``, ``lora_te2_``; FORMATS.md §A.3.2-3).
- ``inputs.safetensors``: ``ids_l`` / ``ids_g`` [B,77] int64 (one 77-token chunk per caption, clip_l padded with EOS,
  clip_g with 0), ``x`` [B,4,h,w], ``t`` [B] int64, ``time_ids`` [B,6] (original h, w, crop top, left, target h, w),
  and a fixed conditioning for the UNet alone: ``context`` [B,77,ctx], ``pooled`` [B,proj].

Work: ``StableDiffusionXLPipeline.lora_state_dict`` (diffusers' kohya converter, with the UNet config, which maps sgm
block names) reads the LoRA first, so a file it rejects fails fast. The UNet and VAE configs come from diffusers' own
single-file builders fed with the spec, with one correction (below); the weights are converted by diffusers' single-file
converters; every component is loaded strictly. Outputs are computed, then
``pipe.load_lora_weights(...)`` + ``pipe.set_adapters(..., adapter_weights=multiplier)``; every warning diffusers logs
and every Python warning while loading is recorded; every stem of the file must have become one peft LoRA layer in
the model its prefix names; then the outputs are computed again.

Output, in ``<workdir>/`` (float32):
- ``outputs.safetensors``, each with suffix ``_base`` (no LoRA) and ``_lora``: ``te1_hidden`` = clip_l
  ``hidden_states[-2]``, ``te1_last`` = clip_l ``last_hidden_state``, ``te2_hidden`` = clip_g ``hidden_states[-2]``,
  ``te2_pooled`` = clip_g ``text_embeds`` (what the SDXL pipeline takes), ``unet`` = the UNet on the fixed ``context``
  / ``pooled`` / ``time_ids``, ``chain`` = the UNet on this model's own conditioning (te1_hidden ‖ te2_hidden,
  te2_pooled, time_ids).
- ``report.json``: package versions; ``load_messages``: the warnings logged while the LoRA loaded; per-model LoRA
  layer counts and the file's stem counts; ``lora_keys_converted`` (down/up weights) and ``lora_alphas_converted``
  in diffusers' converted state dict.

Layout mode, when ``checkpoint.safetensors`` is absent (a layout without weights, e.g. full size): the UNet and both
text encoders are built on the meta device from spec.json (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``),
the LoRA is loaded with ``low_cpu_mem_usage=True`` and the same placement checks run; ``report.json`` only, no outputs.
The loader still checks every LoRA tensor's shape against its peft layer there (a wrong shape raises "size
mismatch"), though peft then moves the loaded weights to the base layers' (meta) device, so values cannot be read.

Exit status 0 on success; otherwise 1, with the traceback and a last line ``diffusers_sdxl_worker: <step> failed: ...``.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

ADAPTER = "trainer"
VAE_SCALE_FACTOR = 0.13025  # SDXL latent scaling (sd_xl_base.yaml scale_factor); the VAE is not exercised
SIZE_FEATURES = 256  # sgm ConcatTimestepEmbedderND outdim per size number = diffusers' addition_time_embed_dim
CLIP_G_PREFIX = "conditioner.embedders.1.model."
# open_clip keeps the CLIP-loss temperature next to the text tower; no part of diffusers' text encoder (diffusers'
# converter only skips it under SD2's prefix)
CLIP_G_NOT_TEXT = ("logit_scale",)


def sgm_original_config(spec: dict) -> dict:
    """The part of an sgm yaml (``model.params``) that diffusers' config builders read, from spec.json."""
    unet = {k: v for k, v in spec["unet"].items() if not (k in ("num_heads", "num_head_channels") and v == -1)}
    return {
        "model": {
            "params": {
                "scale_factor": VAE_SCALE_FACTOR,
                "network_config": {"params": unet},
                "first_stage_config": {"params": {"ddconfig": spec["vae"]}},
            }
        }
    }


def load_strict(module, state_dict: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{what}: missing keys {missing[:5]}…, unexpected keys {unexpected[:5]}…")


def unet_config(original: dict, checkpoint: dict) -> dict:
    """diffusers' UNet config from the sgm parameters. diffusers recognises SDXL's added conditioning ("text_time":
    pooled text ‖ 256 Fourier features per size number) only by the full-size context width (2048 or 1280) and
    otherwise makes it a class projection; the tiny model has the same layout at another width, so the SDXL choice
    is set here from the layout itself (``num_classes: sequential`` and a vector of pooled + 6 × 256)."""
    from diffusers.loaders import single_file_utils as sfu

    config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint)
    params = original["model"]["params"]["network_config"]["params"]
    if params.get("num_classes") == "sequential" and config["addition_embed_type"] != "text_time":
        config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=SIZE_FEATURES)
    return config


def build_text_encoders(spec: dict, checkpoint: dict):
    """diffusers' two SDXL text encoders (``CLIPTextModel``, ``CLIPTextModelWithProjection``) of spec.json's
    ``text_encoder`` / ``text_encoder_2`` configs, holding the checkpoint's ``conditioner.embedders.0.transformer.*``
    and ``conditioner.embedders.1.model.*`` weights as diffusers' single-file converters map them (strictly)."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def strip(model, weights: dict) -> dict:
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
        expected = model.state_dict()
        return {k: v for k, v in weights.items() if k in expected or not k.endswith("position_ids")}

    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
    load_strict(text_encoder, strip(text_encoder, sfu.convert_ldm_clip_checkpoint(checkpoint)), "text encoder (clip_l)")

    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"]))
    g_checkpoint = {k: v for k, v in checkpoint.items() if k.removeprefix(CLIP_G_PREFIX) not in CLIP_G_NOT_TEXT}
    g_weights = sfu.convert_open_clip_checkpoint(text_encoder_2, g_checkpoint, prefix=CLIP_G_PREFIX)
    load_strict(text_encoder_2, strip(text_encoder_2, g_weights), "text encoder 2 (clip_g)")
    return text_encoder, text_encoder_2


def build_pipeline(spec: dict, checkpoint: dict):
    """A StableDiffusionXLPipeline whose UNet, VAE and text encoders hold the checkpoint's weights (no tokenizers:
    neither the LoRA nor the outputs need them; the inputs are token ids)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    original = sgm_original_config(spec)
    u_config = unet_config(original, checkpoint)
    unet = UNet2DConditionModel(**u_config)
    load_strict(unet, sfu.convert_ldm_unet_checkpoint(checkpoint, u_config), "UNet")

    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, checkpoint)
    vae = AutoencoderKL(**vae_config)
    load_strict(vae, sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config), "VAE")

    text_encoder, text_encoder_2 = build_text_encoders(spec, checkpoint)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(  # SDXL's schedule (sd_xl_base.yaml); unused by the outputs
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def forward(pipe, inputs: dict) -> dict:
    """The outputs listed in the module docstring, float32."""
    import torch

    def unet(context, pooled):
        cond = {"text_embeds": pooled, "time_ids": inputs["time_ids"]}
        return pipe.unet(inputs["x"], inputs["t"], encoder_hidden_states=context, added_cond_kwargs=cond).sample

    with torch.no_grad():
        te1 = pipe.text_encoder(inputs["ids_l"], output_hidden_states=True)
        te2 = pipe.text_encoder_2(inputs["ids_g"], output_hidden_states=True)
        out = {
            "te1_hidden": te1.hidden_states[-2],
            "te1_last": te1.last_hidden_state,
            "te2_hidden": te2.hidden_states[-2],
            "te2_pooled": te2.text_embeds,
            "unet": unet(inputs["context"], inputs["pooled"]),
        }
        out["chain"] = unet(torch.cat([out["te1_hidden"], out["te2_hidden"]], dim=-1), out["te2_pooled"])
    return {k: v.float().contiguous() for k, v in out.items()}


def count_lora_layers(model) -> int:
    """Modules of ``model`` into which peft injected our adapter."""
    from peft.tuners.lora import LoraLayer

    return sum(1 for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A)


class Messages(logging.Handler):
    """Collects what diffusers (and peft/transformers) log at WARNING and above."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.name}: {record.getMessage()}")


def load_lora(pipe, workdir: Path, multiplier: float, **kwargs) -> tuple[list[str], dict, dict]:
    """``pipe.load_lora_weights`` + ``set_adapters``: (what the loaders logged or warned, peft layers per model, the
    file's stems per model); raises unless every stem of the file became one peft layer in the model its prefix
    names."""
    import diffusers
    from safetensors import safe_open

    with safe_open(str(workdir / "lora.safetensors"), framework="pt") as f:
        stems = {k.split(".", 1)[0] for k in f.keys()}
    handler = Messages()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    diffusers.utils.logging.set_verbosity_warning()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(workdir), weight_name="lora.safetensors", adapter_name=ADAPTER, **kwargs)
            pipe.set_adapters([ADAPTER], adapter_weights=[multiplier])
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    messages = handler.lines + [f"{w.category.__name__}: {w.message}" for w in caught]

    layers = {
        "lora_unet_": count_lora_layers(pipe.unet),
        "lora_te1_": count_lora_layers(pipe.text_encoder),
        "lora_te2_": count_lora_layers(pipe.text_encoder_2),
    }
    file_stems = {prefix: sum(s.startswith(prefix) for s in stems) for prefix in layers}
    if layers != file_stems or sum(file_stems.values()) != len(stems):
        raise RuntimeError(
            f"peft injected {layers} LoRA layers (UNet, clip_l, clip_g), but the file has {file_stems} stems of "
            f"{len(stems)}: some were not applied; the loaders said: {messages or 'nothing'}"
        )
    return messages, layers, file_stems


def versions() -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    return {"diffusers": diffusers.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}


def meta_pipeline(spec: dict):
    """A StableDiffusionXLPipeline of the spec's UNet and text encoders on the meta device (no VAE, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = unet_config(sgm_original_config(spec), {})  # no checkpoint: only the default sample size reads it
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"]))
    return StableDiffusionXLPipeline(vae=None, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=None, tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler())


def run_layout(workdir: Path, spec: dict, step: list[str]) -> None:
    from diffusers import StableDiffusionXLPipeline

    step[0] = "building the diffusers SDXL models on the meta device"
    pipe = meta_pipeline(spec)
    step[0] = "converting the LoRA with diffusers (StableDiffusionXLPipeline.lora_state_dict)"
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(
        str(workdir), weight_name="lora.safetensors", unet_config=pipe.unet.config
    )
    step[0] = "loading the LoRA with diffusers (load_lora_weights, low_cpu_mem_usage)"
    messages, layers, file_stems = load_lora(pipe, workdir, float(spec["multiplier"]), low_cpu_mem_usage=True)
    step[0] = "writing report.json"
    report = {"versions": versions(), "load_messages": messages, "lora_layers": layers, "lora_file_stems": file_stems,
              "lora_keys_converted": len(converted), "lora_alphas_converted": len(alphas or {})}
    (workdir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")


def run(workdir: Path, step: list[str]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # before diffusers: its import warns about the absent torchvision
    transformers.logging.disable_progress_bar()
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    step[0] = "reading the workdir"
    spec = json.loads((workdir / "spec.json").read_text(encoding="utf-8"))
    if not (workdir / "checkpoint.safetensors").is_file():
        run_layout(workdir, spec, step)
        return
    checkpoint = load_file(str(workdir / "checkpoint.safetensors"))
    inputs = load_file(str(workdir / "inputs.safetensors"))
    lora_keys = list(load_file(str(workdir / "lora.safetensors")))
    torch.manual_seed(0)

    step[0] = "building the diffusers SDXL pipeline from the sgm single file"
    pipe = build_pipeline(spec, checkpoint)
    for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        part.eval()

    step[0] = "converting the LoRA with diffusers (StableDiffusionXLPipeline.lora_state_dict)"
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(
        str(workdir), weight_name="lora.safetensors", unet_config=pipe.unet.config
    )

    step[0] = "computing the outputs without LoRA"
    base = forward(pipe, inputs)

    step[0] = "loading the LoRA with diffusers (load_lora_weights)"
    messages, layers, file_stems = load_lora(pipe, workdir, float(spec["multiplier"]))

    step[0] = "computing the outputs with LoRA"
    lora = forward(pipe, inputs)

    step[0] = "writing outputs.safetensors and report.json"
    outputs = {f"{k}_base": v for k, v in base.items()} | {f"{k}_lora": v for k, v in lora.items()}
    save_file(outputs, str(workdir / "outputs.safetensors"))
    report = {
        "versions": versions(),
        "load_messages": messages,
        "lora_layers": layers,
        "lora_file_stems": file_stems,
        "lora_file_keys": len(lora_keys),
        "lora_keys_converted": len(converted),
        "lora_alphas_converted": len(alphas or {}),
        "multiplier": float(spec["multiplier"]),
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")


def main(argv: list[str]) -> int:
    from worker_cli import worker_main

    return worker_main("diffusers_sdxl_worker", "<workdir>", run, argv, convert=lambda a: [Path(a[0])])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
