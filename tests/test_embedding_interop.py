"""Our embedding files in diffusers: ``load_textual_inversion`` takes the ``.safetensors`` (with ``token=``) and the
WebUI ``.pt``, and the prompt embeddings diffusers computes for "a photo of NAME" equal our training conditioning
(DESIGN.md §4 tier 3). The diffusers side runs in the interop environment through
``tests/interop/diffusers_ti_worker.py``; ``tests/run.sh`` sets ``TRAINER_INTEROP_PYTHON``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import interop_spec_json, make_bundle, make_images, tiny_state_dict
from safetensors.torch import load_file, save_file

from lib_train.config import default_config
from lib_train.embedding.files import load_embedding
from lib_train.embedding.inject import Injection
from lib_train.models.build import clip_tokenizer_files
from lib_train.models.conditioning import PLACEHOLDER_ID
from lib_train.train.ti_trainer import prepare_embedding_data, train_embedding

HERE = Path(__file__).resolve().parent
WORKER = HERE / "interop" / "diffusers_ti_worker.py"
INTEROP_PYTHON = os.environ.get("TRAINER_INTEROP_PYTHON", "")
PROMPTS = ["a photo of laohuang", "laohuang, laohuang in a garden, watercolor"]
VECTORS = 3

pytestmark = pytest.mark.skipif(not Path(INTEROP_PYTHON).is_file(),
                                reason="TRAINER_INTEROP_PYTHON is not set: run `bash tests/run.sh`")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """An embedding (3 vectors, .safetensors + .pt) written by our trainer on the tiny SD1 model."""
    tmp = tmp_path_factory.mktemp("ti-interop-train")
    make_images(tmp / "data" / "3_thing", n=2)
    cfg = default_config("embedding")
    cfg.data.train_dir, cfg.data.resolution = str(tmp / "data"), 64
    cfg.data.min_bucket_side, cfg.data.max_bucket_side = 64, 128
    cfg.embedding.init_text, cfg.embedding.vectors, cfg.embedding.write_pt = "man in a leather jacket", VECTORS, True
    cfg.optim.lr, cfg.train.epochs = 5e-2, 1
    cfg.output.output_dir, cfg.output.name = str(tmp / "out"), "laohuang"
    return Path(train_embedding(cfg, make_bundle("sd1"), prepare_embedding_data(cfg)).final_file)


def test_diffusers_loads_our_files_and_computes_our_conditioning(trained, tmp_path):
    work = tmp_path / "work"
    (work / "tokenizer").mkdir(parents=True)
    save_file(tiny_state_dict("sd1"), str(work / "checkpoint.safetensors"))
    (work / "spec.json").write_text(json.dumps(interop_spec_json()))
    for name in ("vocab.json", "merges.txt"):
        (work / "tokenizer" / name).write_bytes((clip_tokenizer_files() / name).read_bytes())
    for ext in (".safetensors", ".pt"):
        (work / f"laohuang{ext}").write_bytes(trained.with_suffix(ext).read_bytes())
    files = [{"file": "laohuang.safetensors", "token": "laohuang"}, {"file": "laohuang.pt", "token": None}]
    (work / "request.json").write_text(json.dumps({"prompts": PROMPTS, "files": files}))

    proc = subprocess.run([INTEROP_PYTHON, str(WORKER), str(work)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    theirs = load_file(str(work / "outputs.safetensors"))
    report = json.loads((work / "report.json").read_text())
    for entry in report["files"]:  # the .pt's "name" field and token= both give laohuang, laohuang_1, laohuang_2
        assert sorted(entry["added_tokens"]) == ["laohuang", "laohuang_1", "laohuang_2"], entry

    bundle = make_bundle("sd1")
    cond = bundle.encode_text
    vectors = load_embedding(trained).vectors
    with torch.no_grad():
        plain = cond(PROMPTS)
        injection = Injection(cond, "laohuang", vectors)
        try:
            ids, _ = cond.tokenize_prompts(PROMPTS)
            ours = cond(PROMPTS)
        finally:
            injection.remove()
    assert ids.shape[1] == 1 and ours.shape == (2, 77, 32)
    assert (ours - plain).abs().max() > 1e-3  # the embedding matters

    for i in range(len(files)):
        for j in range(len(PROMPTS)):
            their_ids, our_ids = theirs[f"ids_{i}_{j}"], ids[j, 0]
            slots = (our_ids == PLACEHOLDER_ID).nonzero().flatten()
            assert len(slots) == VECTORS * (1 + j)  # the name once, then twice
            added = sorted(report["files"][i]["added_tokens"].values())
            assert their_ids[slots].tolist() == added * (1 + j)  # same slots: laohuang, _1, _2 in order
            keep = our_ids != PLACEHOLDER_ID
            assert torch.equal(their_ids[keep], our_ids[keep])  # every other token the same
            torch.testing.assert_close(theirs[f"embeds_{i}_{j}"][0], ours[j], rtol=1e-4, atol=1e-5)
