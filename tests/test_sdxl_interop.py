"""Our SDXL LoRA files in diffusers (sgm tier: needs ``SD_WEBUI_DIR`` for sgm, and the interop environment).

A tiny SDXL built from sgm's own classes is written as an SDXL single file (sgm keys, as the WebUI saves one); a LoRA
with UNet Linear targets, LoCon convs and both text encoders (random up weights, so it changes every output) is
written by our kohya writer. In ``.venv-interop`` (``tests/interop/diffusers_sdxl_worker.py``) diffusers converts the
single file into its SDXL UNet / CLIPTextModel / CLIPTextModelWithProjection, loads the LoRA with
``load_lora_weights`` and reports its outputs. Here: every stem became a peft layer in the right model, nothing was
logged while loading (no unexpected or missing keys), and the outputs equal ours without and with the LoRA.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_train.models.conditioning import ImageSize

HERE = Path(__file__).resolve().parent
WORKER = HERE / "interop" / "diffusers_sdxl_worker.py"
INTEROP_PYTHON = os.environ.get("TRAINER_INTEROP_PYTHON", "")

pytestmark = pytest.mark.skipif(not Path(INTEROP_PYTHON).is_file(),
                                reason="TRAINER_INTEROP_PYTHON is not set: run `bash tests/run.sh`")

CAPTIONS = ["a photo of a red cat on a sofa", "two dogs, running, snow"]
SIZES = [ImageSize((96, 64), (8, 0), (64, 64)), ImageSize((64, 128), (8, 0), (64, 64))]  # one per caption
RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 2.0, 2, 1.5
UP_STD = 0.05  # random lora_up weights (kohya starts them at 0, which would change nothing)
OUTPUTS = ("te1_hidden", "te1_last", "te2_hidden", "te2_pooled", "unet", "chain")


def _worker(work: Path) -> subprocess.CompletedProcess:
    return subprocess.run([INTEROP_PYTHON, str(WORKER), str(work)], capture_output=True, text=True, timeout=600)


def _ours(bundle, inputs: dict, fixed: dict) -> dict[str, torch.Tensor]:
    """Our outputs for the worker's inputs (the names of the worker's docstring), under the LoRA as it is now."""
    clip_l, clip_g = bundle.encode_text.conditioner.encoders
    with torch.no_grad():
        te1_hidden, _ = clip_l.encode_ids_pooled(inputs["ids_l"][:, None])
        te2_hidden, pooled = clip_g.encode_ids_pooled(inputs["ids_g"][:, None])
        te1_last = bundle.text_encoder.embedders[0].transformer(input_ids=inputs["ids_l"]).last_hidden_state
        unet = bundle.predict(inputs["x"], inputs["t"], fixed)
        chain = bundle.predict(inputs["x"], inputs["t"], bundle.conditioning(CAPTIONS, SIZES))
    return {"te1_hidden": te1_hidden, "te1_last": te1_last, "te2_hidden": te2_hidden, "te2_pooled": pooled[:, 0],
            "unet": unet, "chain": chain}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(our outputs, the worker's outputs, its report, the LoRA file's stems, the workdir)."""
    from sdxl_models import diffusers_text_configs, sgm_root, tiny_sgm_sdxl

    sgm_root()
    from lib_train.models.bundle import ModelBundle
    from lib_train.models.families import SDXL
    from lib_train.models.sdxl_load import REQUIRED, sgm_config
    from lib_train.models.spec import infer_sdxl_spec
    from lib_train.network.kohya_file import read_lora_file, save_lora_file
    from lib_train.network.lora import LoRANetwork

    work = tmp_path_factory.mktemp("sdxl-interop")
    model = tiny_sgm_sdxl(seed=13)
    sd = {k: t.contiguous() for k, t in model.state_dict().items() if k.startswith(REQUIRED)}
    save_file(sd, str(work / "checkpoint.safetensors"))
    bundle = ModelBundle.from_sgm(model)

    with torch.random.fork_rng():  # the kaiming init of lora_down draws from the global generator
        torch.manual_seed(19)
        net = LoRANetwork.for_model(bundle.unet, bundle.text_encoder, family=SDXL, rank=RANK, alpha=ALPHA,
                                    conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA)
    gen = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for pair in net.pairs.values():
            pair.lora_up.weight.copy_(torch.randn(pair.lora_up.weight.shape, generator=gen) * UP_STD)
    save_lora_file(work / "lora.safetensors", net.kohya_state_dict(torch.float32),
                   {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    tensors, _ = read_lora_file(work / "lora.safetensors")
    stems = sorted({k.split(".", 1)[0] for k in tensors})

    arch = sgm_config(infer_sdxl_spec(sd))
    clip_l, clip_g = diffusers_text_configs(bundle.text_encoder)
    spec = {"unet": arch["network_config"]["params"], "vae": arch["first_stage_config"]["params"]["ddconfig"],
            "text_encoder": clip_l, "text_encoder_2": clip_g, "multiplier": 1.0}
    (work / "spec.json").write_text(json.dumps(spec, indent=2))

    encoders = bundle.encode_text.conditioner.encoders
    ids = [e.tokenize_prompts(CAPTIONS)[0] for e in encoders]
    assert all(i.shape == (len(CAPTIONS), 1, 77) for i in ids)  # one chunk each: the worker feeds plain [B, 77]
    g = torch.Generator().manual_seed(3)
    time_ids = torch.tensor([[*s.original, *s.crop_top_left, *s.target] for s in SIZES], dtype=torch.float32)
    with torch.no_grad():
        fixed = bundle.conditioning(CAPTIONS, SIZES)  # the base model's conditioning, fed to both UNets
        _, pooled = encoders[1].encode_ids_pooled(ids[1])
    inputs = {"ids_l": ids[0][:, 0], "ids_g": ids[1][:, 0], "x": torch.randn(2, 4, 8, 8, generator=g),
              "t": torch.tensor([15, 730]), "time_ids": time_ids, "context": fixed["crossattn"],
              "pooled": pooled[:, 0].contiguous()}
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(work / "inputs.safetensors"))

    ours = {f"{k}_base": v for k, v in _ours(bundle, inputs, fixed).items()}
    with net:
        ours |= {f"{k}_lora": v for k, v in _ours(bundle, inputs, fixed).items()}

    proc = _worker(work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    theirs = load_file(str(work / "outputs.safetensors"))
    report = json.loads((work / "report.json").read_text())
    return ours, theirs, report, stems, work


def test_every_stem_loads_with_nothing_left_over(run):
    _, _, report, stems, _ = run
    prefixes = ("lora_unet_", "lora_te1_", "lora_te2_")
    expected = {p: sum(s.startswith(p) for s in stems) for p in prefixes}
    assert sum(expected.values()) == len(stems) and all(expected.values())
    assert report["lora_layers"] == expected  # every stem became one peft layer in the model its prefix names
    assert report["lora_file_keys"] == 3 * len(stems)  # down, up, alpha
    assert (report["lora_keys_converted"], report["lora_alphas_converted"]) == (2 * len(stems), len(stems))
    assert report["load_messages"] == []  # no "unexpected keys" / "missing keys" / "not loaded" from the loaders


def test_base_models_equal_ours(run):
    ours, theirs, *_ = run
    for name in OUTPUTS:  # the same random weights on both sides, through diffusers' single-file conversion
        torch.testing.assert_close(theirs[f"{name}_base"], ours[f"{name}_base"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", OUTPUTS)
def test_lora_outputs_equal_ours(run, name):
    ours, theirs, *_ = run
    change = (ours[f"{name}_lora"] - ours[f"{name}_base"]).abs().max()
    assert change > 1e-2  # the LoRA matters here (100× the tolerance below)
    torch.testing.assert_close(theirs[f"{name}_lora"], ours[f"{name}_lora"], rtol=1e-4, atol=1e-4)


def test_a_stem_diffusers_cannot_place_fails_the_worker(run, tmp_path):
    """The check can fail: one stem for a module the model does not have (a third transformer block where the
    tiny layout has two) and the worker stops, naming the counts and what diffusers said (its "unexpected keys"
    warning)."""
    work = tmp_path / "work"  # layout mode (no checkpoint): the tiny models on the meta device
    work.mkdir()
    shutil.copy(run[4] / "spec.json", work / "spec.json")
    tensors = load_file(str(run[4] / "lora.safetensors"))
    real, ghost = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (
        "lora_unet_input_blocks_4_1_transformer_blocks_2_attn1_to_q")
    assert f"{real}.alpha" in tensors and f"{ghost}.alpha" not in tensors
    tensors |= {k.replace(real, ghost): v.clone() for k, v in tensors.items() if k.startswith(f"{real}.")}
    save_file(tensors, str(work / "lora.safetensors"))
    proc = _worker(work)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "some were not applied" in last, proc.stderr
    assert "'lora_unet_': 309" in last and "unexpected keys" in last and "transformer_blocks.2.attn1.to_q" in last


def test_full_size_layout_loads_into_diffusers(tmp_path):
    """kohya's default SDXL targets on the full-size layout (sd_xl_base.yaml's UNet: 722 transformer targets + 66
    LoCon; clip_l 72, clip_g 192), rank 1 with random weights: diffusers' SDXL UNet and text encoders (its config
    builder fed with the same yaml; the meta device, no weights) place every stem, with the shapes the loader
    checks, and nothing is logged. The tiny model above has depth-2 transformers and 3 clip_g layers; this covers
    every index of the real layout."""
    from omegaconf import OmegaConf
    from sdxl_models import (diffusers_text_configs, meta_sdxl_text_encoders, meta_sgm_unet, sgm_root,
                             sgm_unet_config)

    root = sgm_root()
    from lib_train.models.families import SDXL
    from lib_train.network.kohya_file import save_lora_file
    from lib_train.network.lora import LoRANetwork

    text_root = meta_sdxl_text_encoders()
    net = LoRANetwork.for_model(meta_sgm_unet(), text_root, family=SDXL, rank=1, alpha=1.0, conv_rank=1,
                                conv_alpha=1.0)
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for stem, pair in net.pairs.items():  # the pairs live on the meta device: same shapes, real numbers
        for part in ("lora_down", "lora_up"):
            shape = getattr(pair, part).weight.shape
            tensors[f"{stem}.{part}.weight"] = (torch.randn(shape, generator=gen) * 0.01).half()
        tensors[f"{stem}.alpha"] = torch.tensor(pair.alpha, dtype=torch.float16)
    work = tmp_path / "layout"
    work.mkdir()
    save_lora_file(work / "lora.safetensors", tensors, {"ss_base_model_version": "sdxl_base_v1-0"})
    yaml = OmegaConf.load(root / "configs" / "inference" / "sd_xl_base.yaml")
    clip_l, clip_g = diffusers_text_configs(text_root)
    spec = {"unet": sgm_unet_config(),
            "vae": OmegaConf.to_container(yaml.model.params.first_stage_config.params.ddconfig),
            "text_encoder": clip_l, "text_encoder_2": clip_g, "multiplier": 1.0}
    (work / "spec.json").write_text(json.dumps(spec, indent=2))

    proc = _worker(work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((work / "report.json").read_text())
    assert report["lora_file_stems"] == {"lora_unet_": 722 + 66, "lora_te1_": 72, "lora_te2_": 192}
    assert report["lora_layers"] == report["lora_file_stems"]
    n = len(net.stems())
    assert (report["lora_keys_converted"], report["lora_alphas_converted"]) == (2 * n, n)
    assert report["load_messages"] == []
