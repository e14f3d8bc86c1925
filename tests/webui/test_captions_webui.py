"""Captions in bulk in a real AUTOMATIC1111 WebUI, through ``/trainer/v1/captions/*``: the tag table, a preview, an
apply (trigger word first, two tags removed across two folders), Undo back to the original bytes, the apply again,
and a short run whose ``ss_tag_frequency`` shows the new captions.

Skipped unless ``SD_WEBUI_DIR`` names a WebUI checkout (see tests/webui/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

CAPTIONS = {"10_thing/a": "1girl, thing, blurry, red hair", "10_thing/b": "thing, 1girl, watermark",
            "3_scene/c": "outdoors, blurry, thing", "3_scene/d": "outdoors, tree"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("captions") / "data"
    rng = np.random.default_rng(3)
    for stem, caption in CAPTIONS.items():
        (root / stem).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"{stem}.png")
        (root / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return root


def _captions(root: Path) -> dict[str, bytes]:
    return {stem: (root / f"{stem}.txt").read_bytes() for stem in CAPTIONS}


def test_caption_round_trip_and_a_run_on_the_new_captions(webui, folder, lora_config):
    tags = webui.get(f"/trainer/v1/captions/tags?train_dir={quote(str(folder))}")
    assert tags["folders"] == ["10_thing", "3_scene"] and tags["images"] == 4
    assert {t["tag"]: t["folders"] for t in tags["tags"]}["blurry"] == {"10_thing": 1, "3_scene": 1}
    plan = {"train_dir": str(folder), "trigger": "thing", "remove": ["blurry", "watermark"]}
    preview = webui.post("/trainer/v1/captions/preview", plan)
    assert preview["changed"] == 4 and preview["examples"][0]["after"] == "thing, 1girl, red hair"
    original = _captions(folder)
    assert webui.post("/trainer/v1/captions/apply", plan)["changed"] == 4
    applied = _captions(folder)
    assert applied["3_scene/c"] == b"thing, outdoors"
    assert webui.post("/trainer/v1/captions/undo", {"train_dir": str(folder)})["restored"] == 4
    assert _captions(folder) == original
    assert webui.post("/trainer/v1/captions/apply", plan)["changed"] == 4
    assert _captions(folder) == applied
    r = webui.request("POST", "/trainer/v1/captions/preview", {"train_dir": str(folder), "mode": "regex",
                                                              "find": "(["})
    assert r.status == 422 and r.body["detail"][0]["loc"] == ["body", "find"]

    cfg = lora_config("trainer_captions", 2)
    cfg["data"]["train_dir"] = str(folder)
    job = webui.post("/trainer/v1/jobs", cfg)
    status = webui.wait_job(job["id"])
    assert status["state"] == "finished", status
    from safetensors import safe_open

    with safe_open(status["final_file"], "pt") as f:
        frequency = json.loads(f.metadata()["ss_tag_frequency"])
    assert frequency == {"10_thing": {"thing": 2, "1girl": 2, "red hair": 1},
                         "3_scene": {"thing": 2, "outdoors": 2, "tree": 1}}
