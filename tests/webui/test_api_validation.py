"""Issue 12 in a real WebUI: every malformed body answers 422 (413 for one too large) naming the field, with the
value quoted shortened and no server path the request did not send, and nothing is queued or written; never a
500. The same checks without the WebUI: tests/test_validation_api.py and tests/test_validation_settings.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

JOBS = "/trainer/v1/jobs"


def _server_paths(webui) -> list[str]:
    found = [str(webui.lora_dir), str(webui.embeddings_dir)]
    if os.environ.get("SD_WEBUI_DIR"):
        found.append(str(Path(os.environ["SD_WEBUI_DIR"]).resolve()))
    return found


def _refused(webui, r, loc: tuple, *, status: int = 422, sent: str = "") -> str:
    """The answer is ``status`` naming ``loc``; short, no traceback, no server path not in ``sent``; its message."""
    assert r.status == status, (loc, r.status, str(r.body)[:500])
    text = json.dumps(r.body)
    assert len(text) < 5000, text[:500]
    assert "Traceback" not in text
    for path in _server_paths(webui):
        assert path not in text or path in sent, (path, text[:500])
    problems = {tuple(d["loc"]): d["msg"] for d in r.body["detail"]}
    assert loc in problems, (loc, problems)
    return problems[loc]


@pytest.fixture
def nothing_queued(webui):
    before = webui.get(JOBS)
    lora_entries = sorted(p.name for p in webui.lora_dir.iterdir()) if webui.lora_dir.is_dir() else []
    yield
    assert webui.get(JOBS) == before
    after = sorted(p.name for p in webui.lora_dir.iterdir()) if webui.lora_dir.is_dir() else []
    assert after == lora_entries  # no empty run folder left behind


def test_bad_job_bodies_are_422_naming_the_field(webui, lora_config, nothing_queued):
    cases = [
        (lora_config("n" * 5000, 2), ("body", "output", "name"), "at most 200 bytes"),
        (lora_config("n" * 250, 2), ("body", "output", "name"), "at most 200 bytes"),
        ({**lora_config("m", 2), "method": ["lora"]}, ("body", "method"), "must be the name of a method"),
        ({**lora_config("m", 2), "method": {}}, ("body", "method"), "must be the name of a method"),
        ({**lora_config("v", 2), "version": 0}, ("body", "version"), "no config version"),
        ({**lora_config("v", 2), "version": -1}, ("body", "version"), "no config version"),
        (lora_config("c", 2, data={"caption_extension": "/etc/passwd"}), ("body", "data", "caption_extension"),
         "must start with a dot"),
        (lora_config("c", 2, data={"caption_extension": "./x"}), ("body", "data", "caption_extension"),
         "not a file extension"),
        (lora_config("f", 2, train={"noise_offset": "nan"}), ("body", "train", "noise_offset"), "finite number"),
        (lora_config("f", 2, train={"min_snr_gamma": "inf"}), ("body", "train", "min_snr_gamma"), "finite number"),
        (lora_config("p", 2, data={"train_dir": "/tmp/a\x00b"}), ("body", "data", "train_dir"), "NUL"),
        (lora_config("p", 2, data={"train_dir": "/tmp/" + "d" * 300}), ("body", "data", "train_dir"), "255 bytes"),
        (lora_config("s", 2, train={"seed": 2**70}), ("body", "train", "seed"), "too large"),
    ]
    for body, loc, needle in cases:
        r = webui.request("POST", JOBS, body=body)
        assert needle in _refused(webui, r, loc, sent=json.dumps(body)), (loc, r.body)


def test_malformed_bodies_are_refused_before_parsing_blows_up(webui, lora_config, nothing_queued):
    deep = b"[" * 100_000 + b"]" * 100_000
    assert "nested too deeply" in _refused(webui, webui.request("POST", JOBS, raw=deep), ("body",))
    r = webui.request("POST", JOBS, raw=b'{"train": {"noise_offset": NaN}}')
    assert "NaN" in _refused(webui, r, ("body",))
    huge = lora_config("h", 2, network={"rank": "x" * 900_000})
    r = webui.request("POST", JOBS, body=huge)
    assert "900000 characters" in _refused(webui, r, ("body", "network", "rank"))
    r = webui.request("POST", JOBS, raw=b" " * (2 << 20))
    assert "at most" in _refused(webui, r, ("body",), status=413)
    for raw in (b"[1]", b'"x"', b"null"):
        _refused(webui, webui.request("POST", JOBS, raw=raw), ("body",))


def test_a_long_job_id_is_a_short_404(webui):
    r = webui.request("GET", f"{JOBS}/{'x' * 3000}")
    assert r.status == 404 and len(json.dumps(r.body)) < 300


def test_preprocess_refuses_bad_folders_by_name(webui, tmp_path):
    cases = [({"source_dir": str(tmp_path) + "/a\x00b"}, ("body", "source_dir"), "NUL"),
             ({"source_dir": "/tmp/" + "s" * 5000}, ("body", "source_dir"), ""),
             ({"source_dir": str(tmp_path), "dest_dir": "/tmp/" + "d" * 300}, ("body", "dest_dir"), "255 bytes")]
    for body, loc, needle in cases:
        r = webui.request("POST", "/trainer/v1/preprocess", body=body)
        assert needle in _refused(webui, r, loc, sent=json.dumps(body))
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    _refused(webui, webui.request("POST", "/trainer/v1/preprocess", raw=deep), ("body",))
    _refused(webui, webui.request("POST", "/trainer/v1/preprocess", body=["x"]), ("body",))


@pytest.mark.parametrize("clip_skip", [1000, 0, -3, "two", 1.5])
def test_conditioning_clip_skip_is_checked(webui, clip_skip):
    r = webui.request("POST", "/trainer/v1/diagnostics/conditioning", body={"prompts": ["a"], "clip_skip": clip_skip})
    assert "from 1 to 12" in _refused(webui, r, ("body", "clip_skip"))


def test_conditioning_bodies_are_checked(webui):
    for body, loc in (({"prompts": "a"}, ("body", "prompts")), ({"prompts": [3]}, ("body", "prompts", 0)),
                      ({"prompts": ["a"], "sizes": [[10, 10]]}, ("body", "sizes", 0)),
                      ({"prompts": ["a"], "other": 1}, ("body", "other"))):
        _refused(webui, webui.request("POST", "/trainer/v1/diagnostics/conditioning", body=body), loc)
    ok = webui.post("/trainer/v1/diagnostics/conditioning", {"prompts": ["a photo"], "clip_skip": 2})
    assert ok["clip_skip"] == 2 and len(ok["results"]) == 1


def test_a_diverging_job_ends_with_the_reason_and_the_webui_goes_on(webui, lora_config):
    """Issue 12 inside the WebUI: a run that diverges ends as failed with the reason in the job's status, writes no
    file holding inf/nan, leaves the loaded model bit-identical, and the WebUI generates afterwards."""
    from safetensors.torch import load_file

    webui.post("/sdapi/v1/txt2img", {"prompt": "plain", "steps": 1, "width": 64, "height": 64, "seed": 1})
    before = webui.get("/trainer/v1/model-hash")
    job = webui.post(JOBS, lora_config("diverges", 4, optim={"lr": 1e6, "te_lr": 1e6, "max_grad_norm": 0},
                                       output={"save_every_steps": 1, "save_precision": "fp16"}))
    status = webui.wait_job(job["id"])
    assert status["state"] == "error", status
    assert "diverged" in status["error"] and "Traceback" not in status["error"], status["error"]
    out = webui.lora_dir / "diverges"
    for path in out.glob("*.safetensors") if out.is_dir() else []:
        import torch

        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values()), path
    assert webui.get("/trainer/v1/model-hash") == before
    r = webui.post("/sdapi/v1/txt2img", {"prompt": "plain", "steps": 1, "width": 64, "height": 64, "seed": 1})
    assert r["images"]
