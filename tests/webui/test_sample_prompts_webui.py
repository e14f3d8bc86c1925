"""Per-prompt sample options inside a real WebUI (see conftest.py; skipped unless ``SD_WEBUI_DIR`` is set).

Through the API only: a prompt line with a bad option, or a ``--ss`` sampler this WebUI lacks, is refused with 422
naming ``sample.prompts`` and the line before anything runs; a short LoRA run with lines of different sizes, seeds,
negative prompts, CFG scales and samplers makes each sample with the WebUI's own txt2img at the line's size, and the
WebUI's infotext of each PNG shows the line's settings.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

STEPS = 2


def _problems(r) -> dict:
    assert r.status == 422, r.body
    return {tuple(d["loc"]): d["msg"] for d in r.body["detail"]}


def test_a_bad_prompt_line_is_refused_before_the_run(webui, lora_config):
    before = webui.get("/trainer/v1/jobs")
    bad = lora_config("per_prompt_bad", STEPS, sample={"prompts": "[name] --w 64\n[name] --w 513 --q 1",
                                                       "steps": 2})
    r = webui.request("POST", "/trainer/v1/jobs", body=bad)
    assert set(_problems(r)) == {("body", "sample", "prompts")}
    assert [d["msg"] for d in r.body["detail"]] == [
        "sample prompt line 2: --w 513 is not a multiple of 8 (use 512 or 520)",
        "sample prompt line 2: unknown option --q; the options are --n (negative prompt), --w (width), --h (height), "
        "--s (steps), --l (CFG scale), --d (seed), --ss (sampler)"]
    bad = lora_config("per_prompt_bad", STEPS, sample={"prompts": "[name] --ss No Such Sampler", "steps": 2})
    problems = _problems(webui.request("POST", "/trainer/v1/jobs", body=bad))
    assert problems[("body", "sample", "prompts")].startswith(
        "sample prompt line 1: --ss 'No Such Sampler' is not a sampler of this WebUI")
    assert webui.get("/trainer/v1/jobs") == before  # nothing was queued


def test_each_sample_has_its_line_s_size_seed_and_settings(webui, lora_config):
    prompts = ("# two sizes, two seeds (kohya's syntax)\n"
               "[name] --w 64 --h 96 --d 5 --s 2\n"
               "[name], blue --n dark, blurry --w 96 --h 64 --d 6 --l 3 --ss k_euler\n"
               "[name] --d 7 --s 2")
    job = webui.post("/trainer/v1/jobs", lora_config("per_prompt", STEPS, sample={
        "prompts": prompts, "every_steps": STEPS, "steps": 1, "sampler": "Euler a", "negative": "lowres"}))
    status = webui.wait_job(job["id"])
    assert status["state"] == "finished", status
    names = [Path(p).name for p in status["samples"]]
    assert names == [f"per_prompt-{STEPS:06d}-{i}.png" for i in range(3)]
    images = [Image.open(p) for p in status["samples"]]
    assert [im.size for im in images] == [(64, 96), (96, 64), (64, 64)]
    infos = [im.text.get("parameters", "") for im in images]  # the WebUI's own infotext of each generation
    assert "Negative prompt: lowres" in infos[0] and "Seed: 5," in infos[0] and "Size: 64x96" in infos[0]
    assert "Steps: 2," in infos[0] and "Sampler: Euler a," in infos[0]
    assert "Negative prompt: dark, blurry" in infos[1] and "Seed: 6," in infos[1] and "Size: 96x64" in infos[1]
    assert "CFG scale: 3.0" in infos[1] and "Sampler: Euler," in infos[1] and "Steps: 1," in infos[1]
    assert "Seed: 7," in infos[2] and "Size: 64x64" in infos[2]
