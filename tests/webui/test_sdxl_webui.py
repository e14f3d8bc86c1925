"""SDXL in a real AUTOMATIC1111 WebUI (see conftest.py; skipped unless ``SD_WEBUI_DIR`` is set, and unless the
WebUI's loaded checkpoint is SDXL: start it with ``SD_WEBUI_ARGS="--ckpt <an SDXL checkpoint>"``; a random-weight
one built at full size is enough, ~16 GB of RAM in fp32 on the CPU).

Through HTTP, inside the WebUI's process:

- the host accepts the loaded SDXL checkpoint;
- the library's SDXL conditioning (context and vector ``y``) equals the WebUI's ``get_learned_conditioning`` bit
  for bit, for a plain prompt, one of 80+ tokens and the empty prompt, alone and as one batch, at two image sizes;
- a LoRA run (UNet + both text encoders) through ``/trainer/v1/jobs`` finishes, its file is a kohya SDXL LoRA listed
  by ``/sdapi/v1/loras``, ``<lora:NAME:1>`` changes the image, and the model's state-dict hash and flags are the
  same afterwards;
- an embedding run (both text encoders' vectors) finishes, its file holds exactly ``clip_l`` and ``clip_g``, the
  WebUI lists it without a refresh, the prompt naming it gives another image than before the run, the model's hash
  is the same afterwards, and with the WebUI's embeddings database holding the file the conditioning a run trains
  with equals the WebUI's (context and vector ``y``) bit for bit: a short prompt, a name pushed past the chunk
  boundary, comma backtracking, two occurrences, alone and as one batch.

Run the file a second time with ``--medvram-sdxl`` added to ``SD_WEBUI_ARGS``: the same checks then also show that
a run takes the model out of the WebUI's memory hooks and puts every hook, wrapper and device back (the model-hash
route reports them; on a CPU-only WebUI the hooks still exist and move modules between "devices" that are all the
CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from .test_real_webui import _embedding_config, our_errors_in_log

STEPS = 2
NAME = "sdxl_test"
# 80+ tokens of comma-separated words: the WebUI's second 75-token chunk, after backtracking to the last comma
LONG = ", ".join(f"red{i} green{i}" for i in range(20))
SIZES = [[1024, 1024], [832, 1216]]


@pytest.fixture(scope="session")
def sdxl(webui) -> dict:
    """The host report; skips the file when the WebUI's loaded checkpoint is not SDXL."""
    host = webui.get("/trainer/v1/host")
    if host["family"] != "sdxl" and "SDXL" not in host["reason"]:
        pytest.skip(f"the WebUI's loaded checkpoint is not SDXL ({host['checkpoint']}); start it with "
                    "SD_WEBUI_ARGS='--ckpt <SDXL checkpoint>'")
    return host


@pytest.fixture(scope="session")
def medvram(webui, sdxl) -> bool:
    flags = webui.get("/sdapi/v1/cmd-flags")
    return bool(flags.get("medvram") or flags.get("medvram_sdxl"))


@pytest.fixture(scope="session")
def sdxl_initial(webui, sdxl) -> dict:
    """The model's hash, flags and medvram state before any run (a plain generation first, as in
    test_real_webui.initial_state)."""
    webui.post("/sdapi/v1/txt2img", {"prompt": "plain", "steps": 1, "width": 64, "height": 64, "seed": 1})
    return webui.get("/trainer/v1/model-hash")


def test_sdxl_checkpoint_is_accepted(webui, sdxl, sdxl_initial, medvram):
    assert sdxl["supported"] is True and sdxl["family"] == "sdxl" and sdxl["reason"] == "", sdxl
    assert sdxl_initial["tensors"] > 2000 and sdxl_initial["flags"]["instance_forwards"] == 0
    low = sdxl_initial["lowvram"]
    print(f"medvram={medvram} lowvram state before any run: {low}")
    if medvram:  # the WebUI's hooks on the three parts, and the VAE's encode/decode wrappers
        assert low["lowvram"] is True
        assert sorted(low["hooks"]) == ["conditioner#0", "first_stage_model#0", "model#0"], low
        assert sorted(low["wrapped_methods"]) == ["first_stage_model.decode", "first_stage_model.encode"]
    else:
        assert low["lowvram"] is False and low["hooks"] == [] and low["wrapped_methods"] == []
    assert our_errors_in_log(webui.log_text()) == []


def test_sdxl_conditioning_equals_the_webuis_bit_for_bit(webui, sdxl):
    prompts = ["a photo of a cat", LONG, ""]
    report = webui.post("/trainer/v1/diagnostics/conditioning", {"prompts": prompts, "sizes": SIZES})
    assert report["family"] == "sdxl"
    results = report["results"]
    assert len(results) == len(SIZES) * (len(prompts) + 1) * 2  # each prompt alone, then all three as one batch
    shapes = {(tuple(r["prompts"]), r["key"]): r["webui_shape"] for r in results}
    assert shapes[(("a photo of a cat",), "crossattn")] == [1, 77, 2048]
    assert shapes[((LONG,), "crossattn")] == [1, 154, 2048]
    assert shapes[(("",), "crossattn")] == [1, 77, 2048]
    assert shapes[(tuple(prompts), "crossattn")] == [3, 154, 2048]
    assert shapes[(tuple(prompts), "vector")] == [3, 2816]
    for r in results:
        print(f"{r['size']} {r['key']:9} {len(r['prompts'])} prompt(s): equal={r['equal']} "
              f"max_abs_diff={r['max_abs_diff']:.3g} max_abs_value={r['max_abs_value']:.3g}")
    for r in results:
        assert r["library_shape"] == r["webui_shape"], r
        assert r["max_abs_value"] > 0.1, r  # a real encoding, not zeros
        assert r["equal"] and r["max_abs_diff"] == 0.0, r  # alone and as a batch: bit for bit
    # the size embeddings differ between the two sizes: the vectors of one prompt at 1024² and 832×1216 differ
    vectors = [r for r in results if r["key"] == "vector" and r["prompts"] == ["a photo of a cat"]]
    assert len(vectors) == 2 and vectors[0]["size"] != vectors[1]["size"]


@pytest.fixture(scope="session")
def sdxl_run(webui, lora_config, sdxl_initial) -> dict:
    cfg = lora_config(NAME, STEPS, sample={"prompts": "[name]", "every_steps": STEPS, "steps": 2,
                                           "sampler": "Euler"})
    # the state right before the run: a conditioning call since sdxl_initial moved the WebUI's --medvram "module on
    # the GPU" to the conditioner (the WebUI's own bookkeeping, which a run must put back as it found it)
    before = webui.get("/trainer/v1/model-hash")
    assert {k: v for k, v in before.items() if k != "lowvram"} == {
        k: v for k, v in sdxl_initial.items() if k != "lowvram"}
    job = webui.post("/trainer/v1/jobs", cfg)
    assert job["state"] == "queued" and job["total_steps"] == STEPS
    status = webui.wait_job(job["id"], timeout=3600)
    return {"status": status, "before": before, "after": webui.get("/trainer/v1/model-hash")}


def test_sdxl_lora_run_finishes_with_an_sdxl_file(webui, sdxl_run, medvram):
    s = sdxl_run["status"]
    print(f"run: {s['state']} in {s['elapsed_s']} s, losses {s['loss_history']}, notes {s['notes']}")
    assert s["state"] == "finished" and s["step"] == STEPS and s["error"] == "", s
    assert all(p[1] == p[1] for p in s["loss_history"]) and s["loss"] is not None  # finite (NaN != NaN)
    final = Path(s["final_file"])
    assert final == webui.lora_dir / NAME / f"{NAME}.safetensors" and final.is_file()
    from safetensors import safe_open

    with safe_open(str(final), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefixes = {k.split("_", 2)[0] + "_" + k.split("_", 2)[1] + "_" for k in keys}
    assert prefixes == {"lora_unet_", "lora_te1_", "lora_te2_"}, prefixes
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads((final.parent / f"{NAME}.json").read_text(encoding="utf-8"))["sd version"] == "SDXL"
    assert [Path(p).name for p in s["samples"]] == [f"{NAME}-{STEPS:06d}-0.png"]  # the WebUI's own txt2img
    medvram_notes = [n for n in s["notes"] if "--medvram" in n]
    assert len(medvram_notes) == (1 if medvram else 0), s["notes"]
    if medvram:
        assert "3 hooks, 2 VAE wrappers" in medvram_notes[0]


def test_model_is_unchanged_after_the_sdxl_run(sdxl_run, medvram):
    print(f"lowvram state before the run: {sdxl_run['before']['lowvram']}, after: {sdxl_run['after']['lowvram']}")
    assert sdxl_run["after"] == sdxl_run["before"]  # weights, flags, hooks, and the medvram hooks/devices/part
    if medvram:
        assert sdxl_run["before"]["lowvram"]["module_in_gpu"] == "conditioner"  # not the trivial None


def test_sdxl_lora_is_listed_and_changes_the_image(webui, sdxl_run):
    loras = {x["name"]: x for x in webui.get("/sdapi/v1/loras")}
    assert loras[NAME]["path"] == sdxl_run["status"]["final_file"]

    def txt2img(prompt: str) -> tuple[str, str]:
        r = webui.post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64,
                                             "sampler_name": "Euler", "seed": 1})
        return r["images"][0], json.loads(r["info"])["infotexts"][0]

    # The Lora extension's default merges a LoRA into the weights and keeps a CPU copy of every weight it touches:
    # for an fp32 SDXL on the CPU that is ~9 GB more. Its "functional" mode adds the LoRA in forward instead.
    before = webui.get("/sdapi/v1/options")["lora_functional"]
    webui.post("/sdapi/v1/options", {"lora_functional": True})
    try:
        plain, _ = txt2img("thing")
        with_lora, info = txt2img(f"thing <lora:{NAME}:1>")
        again, _ = txt2img("thing")
    finally:
        webui.post("/sdapi/v1/options", {"lora_functional": before})
    assert "Lora hashes" in info and NAME in info
    assert plain == again and with_lora != plain


def test_the_epoch_grid_works_on_the_sdxl_run(webui, sdxl_run):
    """The Epoch × weight grid script on the SDXL run: one row per weight, cells that differ, the LoRA in each
    cell's infotext (the same script as for SD1; tests/webui/test_grid_webui.py covers the rest of it)."""
    from .test_grid_webui import SCRIPT

    args = [f"LoRA: {NAME}/{NAME}", [NAME], "0.5-1 (+0.5)", "Nothing", "", False, True, "", 1.0, False, "grid"]
    before = webui.get("/sdapi/v1/options")["lora_functional"]
    webui.post("/sdapi/v1/options", {"lora_functional": True})  # see the test above
    try:
        r = webui.post("/sdapi/v1/txt2img", {"prompt": "thing", "steps": 2, "width": 64, "height": 64,
                                             "sampler_name": "Euler", "seed": 3, "script_name": SCRIPT,
                                             "script_args": args})
    finally:
        webui.post("/sdapi/v1/options", {"lora_functional": before})
    texts = json.loads(r["info"])["infotexts"]
    assert len(r["images"]) == 3 and len(texts) == 3  # the grid, then its two cells
    assert "<lora:sdxl_test:0.5>" in texts[1] and "<lora:sdxl_test:1>" in texts[2]
    assert r["images"][1] != r["images"][2]


EMB = "zqsdxlemb"  # a made-up word: several tokens, none of them a whole known word
EMB_VECTORS, EMB_STEPS = 3, 3
EMB_PROMPTS = [
    f"a photo of {EMB}",
    " ".join(["thing"] * 73) + f" {EMB} after the boundary",  # 3 slots do not fit after 73 tokens: chunk 2
    " ".join(["thing"] * 69) + f", {EMB} red hat blue",  # the full chunk backtracks to its last comma
    f"{EMB}, {EMB} in a garden, watercolor",  # two occurrences
]


def _txt2img(webui, prompt: str) -> tuple[str, str]:
    r = webui.post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64,
                                         "sampler_name": "Euler", "seed": 1})
    return r["images"][0], json.loads(r["info"])["infotexts"][0]


@pytest.fixture(scope="session")
def sdxl_embedding_run(webui, dataset, sdxl_initial) -> dict:
    image_before, _ = _txt2img(webui, f"a photo of {EMB}")  # no such embedding yet: plain text
    before = webui.get("/trainer/v1/model-hash")
    assert {k: v for k, v in before.items() if k != "lowvram"} == {
        k: v for k, v in sdxl_initial.items() if k != "lowvram"}
    cfg = _embedding_config(dataset, EMB)
    cfg["embedding"]["vectors"], cfg["train"]["max_steps"] = EMB_VECTORS, EMB_STEPS
    job = webui.post("/trainer/v1/jobs", cfg)
    assert job["state"] == "queued" and job["method"] == "embedding" and job["total_steps"] == EMB_STEPS
    status = webui.wait_job(job["id"], timeout=3600)
    return {"status": status, "before": before, "after": webui.get("/trainer/v1/model-hash"),
            "image_before": image_before}


def test_sdxl_embedding_run_writes_clip_l_and_clip_g(webui, sdxl_embedding_run):
    s = sdxl_embedding_run["status"]
    print(f"embedding run: {s['state']} in {s['elapsed_s']} s, losses {s['loss_history']}, notes {s['notes']}")
    assert s["state"] == "finished" and s["step"] == EMB_STEPS and s["error"] == "", s
    assert all(p[1] == p[1] for p in s["loss_history"]) and s["loss"] is not None  # finite (NaN != NaN)
    out = webui.embeddings_dir / EMB  # a folder per run in the WebUI's --embeddings-dir
    assert s["saved"] == [str(out / f"{EMB}-000002.safetensors"), str(out / f"{EMB}.safetensors")]
    from safetensors import safe_open

    for path in s["saved"]:
        with safe_open(path, "pt") as f:
            shapes = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            meta = f.metadata()
        assert shapes == {"clip_l": ([EMB_VECTORS, 768], "F32"), "clip_g": ([EMB_VECTORS, 1280], "F32")}, path
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
        assert meta["modelspec.title"] == Path(path).stem
    # samples from the WebUI's txt2img with the vectors of step 2 and of the end registered as an SDXL embedding
    samples = out / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [f"{EMB}-000002-0.png", f"{EMB}-000003-0.png"]
    assert (samples / f"{EMB}-000002-0.png").read_bytes() != (samples / f"{EMB}-000003-0.png").read_bytes()


def test_model_is_unchanged_after_the_sdxl_embedding_run(sdxl_embedding_run):
    assert sdxl_embedding_run["after"] == sdxl_embedding_run["before"]


def test_sdxl_embedding_is_listed_and_changes_the_image(webui, sdxl_embedding_run):
    listed = webui.get("/sdapi/v1/embeddings")  # no refresh asked for: the run registered its files
    assert EMB not in listed["skipped"] and f"{EMB}-000002" not in listed["skipped"]
    loaded = listed["loaded"]
    assert loaded[EMB]["vectors"] == EMB_VECTORS and loaded[EMB]["shape"] == 768 + 1280  # the WebUI's SDXL record
    assert loaded[f"{EMB}-000002"]["vectors"] == EMB_VECTORS  # the step save too: the grid compares them
    image, info = _txt2img(webui, f"a photo of {EMB}")
    without, _ = _txt2img(webui, "a photo of")
    assert "TI hashes" in info and f"{EMB}:" in info  # the WebUI used our file
    assert image != sdxl_embedding_run["image_before"] and image != without


def test_sdxl_embedding_conditioning_equals_the_webuis_bit_for_bit(webui, sdxl_embedding_run):
    report = webui.post("/trainer/v1/diagnostics/conditioning",
                        {"prompts": EMB_PROMPTS, "sizes": [[1024, 1024]], "embedding": EMB})
    results = report["results"]
    assert len(results) == (len(EMB_PROMPTS) + 1) * 2  # each prompt alone, then all as one batch; context, vector
    for r in results:
        print(f"{r['key']:9} {r['prompts'][0][:24]!r} ({len(r['prompts'])}): equal={r['equal']} "
              f"max_abs_diff={r['max_abs_diff']:.3g} embedding_changes={r['embedding_changes']}")
    shapes = {(tuple(r["prompts"]), r["key"]): r["webui_shape"] for r in results}
    assert shapes[((EMB_PROMPTS[0],), "crossattn")] == [1, 77, 2048]
    assert shapes[((EMB_PROMPTS[1],), "crossattn")] == [1, 154, 2048]  # the name moved on to chunk 2
    assert shapes[((EMB_PROMPTS[2],), "crossattn")] == [1, 154, 2048]
    assert shapes[(tuple(EMB_PROMPTS), "vector")] == [len(EMB_PROMPTS), 2816]
    for r in results:
        assert r["library_shape"] == r["webui_shape"] and r["max_abs_value"] > 0.1, r
        assert r["equal"] and r["max_abs_diff"] == 0.0, r  # bit for bit
    changes = {(tuple(r["prompts"]), r["key"]): r["embedding_changes"] for r in results}
    for prompt in EMB_PROMPTS:  # the embedding is used: ours without it differs (an equality of two sides that
        assert changes[((prompt,), "crossattn")], prompt  # both ignored the name would not)
    for prompt in (EMB_PROMPTS[0], EMB_PROMPTS[3]):  # y: the first chunk's pooled clip_g output, holding the name
        assert changes[((prompt,), "vector")], prompt
    bad = webui.request("POST", "/trainer/v1/diagnostics/conditioning",
                        body={"prompts": ["x"], "sizes": [[1024, 1024]], "embedding": "no_such_embedding"})
    assert bad.status == 422 and "no_such_embedding" in bad.body["detail"], bad.body


def test_log_has_no_errors_from_our_code(webui, sdxl_run, sdxl_embedding_run):
    assert our_errors_in_log(webui.log_text()) == []
