"""Our LoRA files in other people's loaders: diffusers (+ peft) loads a file our trainer wrote and reproduces the
outputs of our own LoRA-applied model (DESIGN.md §4 tier 3).

The diffusers side runs in its own environment (``.venv-interop``, newer packages than the WebUI's pins) through
``tests/interop/diffusers_worker.py``; ``tests/run.sh`` creates it and sets ``TRAINER_INTEROP_PYTHON``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import interop_spec_json, make_bundle, make_images, tiny_config, tiny_state_dict
from safetensors.torch import load_file, save_file

from lib_train.models.build import clip_tokenizer_files
from lib_train.network.kohya_file import read_lora_file
from lib_train.network.lora import LoRANetwork
from lib_train.train.lora_trainer import prepare_data, train_lora

HERE = Path(__file__).resolve().parent
WORKER = HERE / "interop" / "diffusers_worker.py"
INTEROP_PYTHON = os.environ.get("TRAINER_INTEROP_PYTHON", "")

pytestmark = pytest.mark.skipif(not Path(INTEROP_PYTHON).is_file(),
                                reason="TRAINER_INTEROP_PYTHON is not set: run `bash tests/run.sh`")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA (UNet + text encoder + LoCon convs) written by our trainer on the tiny SD1 model."""
    tmp = tmp_path_factory.mktemp("interop-train")
    make_images(tmp / "data" / "3_thing", n=2)
    cfg = tiny_config(tmp, optim__lr=2e-2, optim__te_lr=2e-2, network__conv_rank=4, network__conv_alpha=2.0,
                      output__save_precision="fp32")
    bundle = make_bundle("sd1")
    result = train_lora(cfg, bundle, prepare_data(cfg))
    return Path(result.final_file)


def _ours(lora_file: Path, inputs: dict, multiplier: float) -> dict[str, torch.Tensor]:
    bundle = make_bundle("sd1")
    tensors, _ = read_lora_file(lora_file)
    net = LoRANetwork.for_model(bundle.unet, bundle.text_encoder, family="sd1", rank=4, alpha=4.0, conv_rank=4,
                                conv_alpha=2.0)
    net.load_kohya_state_dict(tensors)
    net.multiplier = multiplier
    te = bundle.text_encoder.transformer
    with torch.no_grad():
        te_base = te(input_ids=inputs["input_ids"]).last_hidden_state
        unet_base = bundle.predict(inputs["x"], inputs["t"], te_base)
        with net.apply():
            te_out = te(input_ids=inputs["input_ids"]).last_hidden_state
            unet_out = bundle.predict(inputs["x"], inputs["t"], te_out)
    return {"te_base": te_base, "unet_base": unet_base, "te_out": te_out, "unet_out": unet_out}


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_diffusers_loads_our_file_and_matches_our_outputs(trained, tmp_path, multiplier):
    work = tmp_path / "work"
    (work / "tokenizer").mkdir(parents=True)
    save_file(tiny_state_dict("sd1"), str(work / "checkpoint.safetensors"))
    (work / "spec.json").write_text(json.dumps(interop_spec_json(multiplier)))
    (work / "lora.safetensors").write_bytes(trained.read_bytes())
    tok = clip_tokenizer_files()
    for name in ("vocab.json", "merges.txt"):
        (work / "tokenizer" / name).write_bytes((tok / name).read_bytes())
    g = torch.Generator().manual_seed(7)
    ids = torch.full((2, 77), 49407, dtype=torch.long)
    ids[:, 0] = 49406
    ids[:, 1:6] = torch.randint(300, 40000, (2, 5), generator=g)
    inputs = {"x": torch.randn(2, 4, 8, 8, generator=g), "t": torch.tensor([10, 700]), "input_ids": ids}
    save_file(inputs, str(work / "inputs.safetensors"))

    proc = subprocess.run([INTEROP_PYTHON, str(WORKER), str(work)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    theirs = load_file(str(work / "outputs.safetensors"))
    report = json.loads((work / "report.json").read_text())
    tensors, _ = read_lora_file(trained)
    stems = {k.split(".")[0] for k in tensors}
    assert report["stems"] == len(stems)  # every stem became a LoRA layer in diffusers/peft
    ours = _ours(trained, inputs, multiplier)

    for key in ("te_base", "unet_base"):  # same random base weights on both sides
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-4, atol=1e-4)
    assert (ours["unet_out"] - ours["unet_base"]).abs().max() > 1e-2  # the LoRA matters
    assert (ours["te_out"] - ours["te_base"]).abs().max() > 1e-2
    for key in ("te_out", "unet_out"):
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-4, atol=1e-4)
