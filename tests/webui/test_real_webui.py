"""The extension inside a real AUTOMATIC1111 WebUI (see conftest.py; skipped unless ``SD_WEBUI_DIR`` is set).

Through HTTP only, on the WebUI's loaded random-weight SD1 checkpoint: the extension loads cleanly, the API is
guarded and rejects bad input by field, headless conditioning equals the WebUI's, short LoRA runs complete, land in
the Lora list and change txt2img output, and the loaded model's state dict and flags are the same before and after
every run (finished, interrupted from our API, interrupted by the WebUI's Interrupt, resumed).

The tests share one server and run in file order (the model hash is taken first; the runs build on each other).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import ROOT

TERMINAL = ("finished", "interrupted", "error")
STEPS = 3


def our_errors_in_log(text: str) -> list[str]:
    """Log lines that show an error raised in this repository's code (the WebUI's own harmless "no git remote"
    traceback for the extension's folder has no frame in our files)."""
    ours = (str(ROOT), "extensions/sd-webui-trainer/")
    frames = [ln for ln in text.splitlines() if ln.strip().startswith("File \"") and any(p in ln for p in ours)]
    reports = [ln for ln in text.splitlines() if "Error loading script: trainer.py" in ln
               or "sd-webui-trainer: job" in ln]
    return frames + reports


@pytest.fixture(scope="session")
def initial_state(webui) -> dict:
    """The loaded model's hash and flags with the checkpoint's own weights. A generation without ``<lora:…>`` first:
    other test files of the session may have left a LoRA merged into the weights (the Lora extension keeps it until
    the next generation), and a run takes merged LoRAs out."""
    webui.post("/sdapi/v1/txt2img", {"prompt": "plain", "steps": 1, "width": 64, "height": 64, "seed": 1})
    return webui.get("/trainer/v1/model-hash")


def test_extension_loads_without_errors(webui):
    assert our_errors_in_log(webui.log_text()) == []
    host = webui.get("/trainer/v1/host")
    assert host["supported"] is True and host["family"] == "sd1" and host["reason"] == ""
    assert host["checkpoint"]
    assert isinstance(webui.get("/trainer/v1/jobs"), list)
    options = webui.get("/sdapi/v1/options")  # our Settings section
    assert options["sd_trainer_output_subfolder"] == "" and options["sd_trainer_offload_vae"] is True
    assert {"sd_trainer_embedding_subfolder", "sd_trainer_sample_prompts", "sd_trainer_sample_every_epochs"} <= set(options)


def test_routes_require_the_api_credentials(webui):
    assert webui.request("GET", "/trainer/v1/jobs", auth=False).status == 401
    assert webui.request("POST", "/trainer/v1/jobs", body={}, auth=False).status == 401
    webui.password, right = "wrong", webui.password
    try:
        assert webui.request("GET", "/trainer/v1/host").status == 401
    finally:
        webui.password = right


def test_initial_model_state(initial_state):
    assert re.fullmatch(r"[0-9a-f]{64}", initial_state["sha256"])
    assert initial_state["tensors"] > 1000 and initial_state["flags"]["instance_forwards"] == 0


def _problems(r) -> dict:
    assert r.status == 422, r.body
    return {tuple(d["loc"]): d["msg"] for d in r.body["detail"]}


def test_bad_json_and_bad_settings_are_422_naming_the_field(webui, lora_config, tmp_path):
    jobs_before = webui.get("/trainer/v1/jobs")
    r = webui.request("POST", "/trainer/v1/jobs", raw=b'{"network": {"rank": 4,}')
    assert list(_problems(r)) == [("body",)] and "not valid JSON" in r.body["detail"][0]["msg"]

    r = webui.request("POST", "/trainer/v1/jobs", body=[1, 2])
    assert list(_problems(r)) == [("body",)]

    bad = lora_config("bad", 2, network={"rank": "four", "ranks": 4}, optim={"lr": -1})
    problems = _problems(webui.request("POST", "/trainer/v1/jobs", body=bad))
    assert ("body", "network", "rank") in problems and "expected int" in problems[("body", "network", "rank")]
    assert ("body", "network", "ranks") in problems and "unknown setting" in problems[("body", "network", "ranks")]

    bad = lora_config("bad", 2, optim={"lr": -1}, data={"train_dir": str(tmp_path / "missing")})
    problems = _problems(webui.request("POST", "/trainer/v1/jobs", body=bad))
    assert set(problems) == {("body", "optim", "lr"), ("body", "data", "train_dir")}

    bad = lora_config("a/b", 2)
    assert set(_problems(webui.request("POST", "/trainer/v1/jobs", body=bad))) == {("body", "output", "name")}

    broken = tmp_path / "broken" / "1_x"
    broken.mkdir(parents=True)
    (broken / "img.png").write_bytes(b"not a png")
    bad = lora_config("bad", 2, data={"train_dir": str(broken.parent)})
    problems = _problems(webui.request("POST", "/trainer/v1/jobs", body=bad))
    assert [loc[0] for loc in problems] == ["dataset"] and any("img.png" in loc[1] for loc in problems)
    assert webui.get("/trainer/v1/jobs") == jobs_before  # nothing was queued


# An 80-token prompt of comma-separated words fills chunk 1; backtracking moves the words after its last comma on.
LONG = ", ".join(f"red{i} green{i}" for i in range(20))


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_headless_conditioning_equals_the_webuis(webui, clip_skip):
    prompts = ["a photo of a cat", LONG, ""]
    report = webui.post("/trainer/v1/diagnostics/conditioning", {"prompts": prompts, "clip_skip": clip_skip})
    assert report["family"] == "sd1"
    shapes = [r["webui_shape"] for r in report["results"]]
    assert shapes == [[1, 77, 768], [1, 154, 768], [1, 77, 768]]
    for r in report["results"]:
        assert r["library_shape"] == r["webui_shape"], r
        assert r["max_abs_value"] > 0.1  # a real encoding, not zeros
        assert r["max_abs_diff"] <= 1e-5, r


@pytest.fixture(scope="session")
def finished_run(webui, lora_config, initial_state) -> dict:
    job = webui.post("/trainer/v1/jobs", lora_config("trainer_test", STEPS, sample={
        "prompts": "[name]\n[name], blue", "every_steps": 2, "steps": 2, "sampler": "Euler"}))
    assert job["state"] == "queued" and job["total_steps"] == STEPS
    status = webui.wait_job(job["id"])
    return {"status": status, "after": webui.get("/trainer/v1/model-hash")}


def test_lora_run_completes_into_the_lora_folder(webui, finished_run):
    s = finished_run["status"]
    assert s["state"] == "finished", s
    assert s["step"] == STEPS and s["loss"] is not None and s["error"] == ""
    out = webui.lora_dir / "trainer_test"  # default: a folder per run in the WebUI's --lora-dir
    assert Path(s["output_dir"]) == out.resolve()
    assert s["final_file"] == str(out / "trainer_test.safetensors") and Path(s["final_file"]).is_file()
    assert s["saved"] == [s["final_file"]]
    # samples through the WebUI's own txt2img at step 2 and at the end, the last one the card picture
    assert s["sample_step"] == STEPS and [Path(p).name for p in s["samples"]] == [
        f"trainer_test-{STEPS:06d}-0.png", f"trainer_test-{STEPS:06d}-1.png"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "trainer_test-000002-0.png", "trainer_test-000002-1.png", "trainer_test-000003-0.png",
        "trainer_test-000003-1.png"]
    assert (out / "trainer_test.preview.png").read_bytes() == Path(s["samples"][0]).read_bytes()
    assert len(s["loss_history"]) == STEPS and [p[0] for p in s["loss_history"]] == [1, 2, 3]
    sidecar = json.loads((out / "trainer_test.json").read_text(encoding="utf-8"))
    assert sidecar == {"sd version": "SD1", "activation text": "thing"}
    assert json.loads((out / "trainer_test.config.json").read_text())["model"]["checkpoint"] == ""
    assert webui.get(f"/trainer/v1/jobs/{s['id']}") == s
    assert webui.request("GET", "/trainer/v1/jobs/nope").status == 404


def test_model_is_unchanged_after_a_finished_run(initial_state, finished_run):
    assert finished_run["after"] == initial_state


def test_new_lora_is_listed_without_a_manual_refresh(webui, finished_run):
    loras = {x["name"]: x for x in webui.get("/sdapi/v1/loras")}
    assert "trainer_test" in loras
    assert loras["trainer_test"]["path"] == finished_run["status"]["final_file"]
    assert loras["trainer_test"]["metadata"]["ss_output_name"] == "trainer_test"


def _txt2img(webui, prompt: str) -> tuple[str, str]:
    r = webui.post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64,
                                         "sampler_name": "Euler", "seed": 1})
    return r["images"][0], json.loads(r["info"])["infotexts"][0]


def test_txt2img_with_the_new_lora_differs(webui, finished_run):
    plain, _ = _txt2img(webui, "thing")
    with_lora, info = _txt2img(webui, "thing <lora:trainer_test:1>")
    again, _ = _txt2img(webui, "thing")
    assert "Lora hashes" in info and "trainer_test" in info
    assert plain == again  # the same seed gives the same image: a difference is the LoRA's
    assert with_lora != plain


def test_interrupt_resume_and_webui_interrupt_leave_the_model_unchanged(webui, lora_config, initial_state,
                                                                        finished_run):
    _txt2img(webui, "thing <lora:trainer_test:1>")  # the Lora extension now has the LoRA merged into the weights
    total = 5
    # A stop request is read after each step: asked during step n, the run stops after step n and saves.
    job = webui.post("/trainer/v1/jobs", lora_config("trainer_int", total))
    busy = webui.request("POST", "/trainer/v1/jobs", body=lora_config("trainer_other", 2))
    assert busy.status == 409 and job["id"] in busy.body["detail"]  # one job at a time
    webui.wait_job(job["id"], until=lambda s: s["step"] >= 1 or s["state"] in TERMINAL)
    progress = webui.get("/sdapi/v1/progress?skip_current_image=true")  # the WebUI's progress bar follows the run
    assert progress["state"]["job_count"] == total and progress["state"]["job"] == f"task(trainer-{job['id']})"
    assert progress["textinfo"].startswith("Training step") and 0 < progress["progress"] < 1
    webui.post(f"/trainer/v1/jobs/{job['id']}/interrupt")
    first = webui.wait_job(job["id"])
    assert first["state"] == "interrupted", first
    assert first["step"] in (2, 3) and Path(first["state_dir"]).is_dir()  # 3 only if polling lagged a whole step
    assert first["final_file"].endswith(f"trainer_int-step{first['step']:08d}.safetensors")
    assert "trainer_test" in " ".join(first["notes"])  # told that the merged LoRA was taken out of the weights
    assert webui.get("/trainer/v1/model-hash") == initial_state

    second = webui.post(f"/trainer/v1/jobs/{first['id']}/resume")
    assert second["resumed_from"] == first["state_dir"] and second["step"] == first["step"]
    webui.wait_job(second["id"], until=lambda s: s["phase"].startswith("Training") or s["state"] in TERMINAL)
    webui.post("/sdapi/v1/interrupt")  # the WebUI's own Interrupt button, during the first resumed step
    second = webui.wait_job(second["id"])
    assert second["state"] == "interrupted" and second["step"] == first["step"] + 1, second
    assert webui.get("/trainer/v1/model-hash") == initial_state

    third = webui.wait_job(webui.post(f"/trainer/v1/jobs/{second['id']}/resume")["id"])
    assert third["state"] == "finished" and third["step"] == total, third
    assert [p[0] for p in third["loss_history"]] == list(range(1, total + 1))  # one curve across the sessions
    assert third["phase"] == f"Finished {total} steps" and second["phase"].startswith("Interrupted after step")
    assert Path(third["final_file"]).name == "trainer_int.safetensors"
    assert webui.get("/trainer/v1/model-hash") == initial_state
    assert webui.request("POST", f"/trainer/v1/jobs/{third['id']}/resume").status == 409
    assert [j["state"] for j in webui.get("/trainer/v1/jobs")][:3] == ["finished", "interrupted", "interrupted"]


EMB = "zqtrainemb"  # a made-up word: several tokens, none of them a whole known word


def _embedding_config(dataset: Path, name: str, **output) -> dict:
    return {"method": "embedding",
            "data": {"train_dir": str(dataset), "resolution": 64, "min_bucket_side": 64, "max_bucket_side": 128},
            "embedding": {"vectors": 2, "init_text": "thing", "template": "subject"},
            "optim": {"lr": 0.05}, "train": {"max_steps": 3},
            "output": {"name": name, "save_every_epochs": 0, "save_every_steps": 2, **output},
            "sample": {"prompts": "a photo of [name]", "every_steps": 2, "steps": 2, "sampler": "Euler"}}


@pytest.fixture(scope="session")
def embedding_run(webui, dataset, initial_state) -> dict:
    before, _ = _txt2img(webui, f"a photo of {EMB}")  # no such embedding yet: plain text
    job = webui.post("/trainer/v1/jobs", _embedding_config(dataset, EMB))
    assert job["method"] == "embedding" and job["total_steps"] == 3
    status = webui.wait_job(job["id"])
    return {"status": status, "after": webui.get("/trainer/v1/model-hash"), "image_before": before}


def test_embedding_run_completes_into_the_embeddings_folder(webui, embedding_run):
    s = embedding_run["status"]
    assert s["state"] == "finished" and s["step"] == 3 and s["error"] == "", s
    out = webui.embeddings_dir / EMB  # default: a folder per run in the WebUI's --embeddings-dir
    assert Path(s["output_dir"]) == out.resolve()
    assert s["saved"] == [str(out / f"{EMB}-000002.safetensors"), str(out / f"{EMB}.safetensors")]
    assert all(Path(p).is_file() for p in s["saved"])
    # samples with the vectors of step 2 and of the end (registered in the WebUI's database only while sampling)
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"{EMB}-000002-0.png", f"{EMB}-000003-0.png"]
    assert (out / f"{EMB}-000002.preview.png").is_file() and (out / f"{EMB}.preview.png").is_file()
    assert (out / "samples" / f"{EMB}-000002-0.png").read_bytes() != (out / "samples" / f"{EMB}-000003-0.png").read_bytes()


def test_model_is_unchanged_after_an_embedding_run(initial_state, embedding_run):
    assert embedding_run["after"] == initial_state


def test_new_embedding_is_loaded_without_a_manual_refresh(webui, embedding_run):
    loaded = webui.get("/sdapi/v1/embeddings")["loaded"]
    assert loaded[EMB]["vectors"] == 2 and loaded[EMB]["shape"] == 768
    assert loaded[f"{EMB}-000002"]["vectors"] == 2  # the intermediate save too: the grid compares them
    image, info = _txt2img(webui, f"a photo of {EMB}")
    assert f"{EMB}:" in info and "TI hashes" in info  # the WebUI used our file
    assert image != embedding_run["image_before"]


def test_an_embedding_name_loaded_from_elsewhere_is_refused(webui, dataset, embedding_run, tmp_path):
    clash = _embedding_config(dataset, EMB, output_dir=str(tmp_path / "elsewhere"))
    problems = _problems(webui.request("POST", "/trainer/v1/jobs", body=clash))
    assert list(problems) == [("body", "output", "name")]
    assert "already loaded from" in problems[("body", "output", "name")]


def test_runs_on_disk_are_listed(webui, finished_run, embedding_run):
    runs = {r["label"]: r for r in webui.get("/trainer/v1/runs")}
    lora = next(r for r in runs.values() if r["kind"] == "lora" and r["name"] == "trainer_test")
    assert [f["stem"] for f in lora["files"]] == ["trainer_test"] and lora["config"].endswith("trainer_test.config.json")
    emb = next(r for r in runs.values() if r["kind"] == "embedding" and r["name"] == EMB)
    assert [f["stem"] for f in emb["files"]] == [f"{EMB}-000002", EMB]


def test_log_has_no_errors_from_our_code(webui):
    assert our_errors_in_log(webui.log_text()) == []
