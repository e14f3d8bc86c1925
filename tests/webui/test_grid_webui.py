"""The Epoch × weight grid and the X/Y/Z axes in a real AUTOMATIC1111 WebUI (see conftest.py; skipped unless
``SD_WEBUI_DIR`` is set).

Through HTTP only: a 3-epoch LoRA run made through ``/trainer/v1/jobs``, then ``/sdapi/v1/txt2img`` with
``script_name``/``script_args``: one grid of the right size made of the returned cells (files across, weights
down, one drawn seed), cells that differ across epochs and weights, labels, progress and Interrupt during the grid,
the Trainer axes of the built-in X/Y/Z plot, and keeping a choice (preferred weight in the sidecar, the epoch
promoted to the final file, which then renders exactly as that epoch did).

The tests share one server and one run and go in file order (the last ones change the run's files).
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image

SCRIPT = "Epoch × weight grid"
RUN = "grid_test"
LABEL = f"LoRA: {RUN}/{RUN}"
SIZE = 64
FILES = [f"{RUN}-000001", f"{RUN}-000002", RUN]


def grid_args(files=(), weights="0.5-1.5 (+0.5)", third=("Nothing", ""), legend=False, cells=True,
              keep=("", 1.0, False), mode="grid") -> list:
    """``script_args`` in the order of the script's controls (lib_train.webui.grid.script.ARG_NAMES)."""
    return [LABEL, list(files), weights, third[0], third[1], legend, cells, keep[0], keep[1], keep[2], mode]


def txt2img(webui, prompt: str, seed: int, script_args: list | None = None, steps: int = 2, **extra) -> dict:
    body = {"prompt": prompt, "steps": steps, "width": SIZE, "height": SIZE, "sampler_name": "Euler", "seed": seed,
            **extra}
    if script_args is not None:
        body.update(script_name=SCRIPT, script_args=script_args)
    r = webui.post("/sdapi/v1/txt2img", body)
    r["info"] = json.loads(r["info"])
    r["pixels"] = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in r["images"]]
    return r


def our_errors_in_log(text: str) -> list[str]:
    ours = (str(ROOT), "extensions/sd-webui-trainer/")
    frames = [ln for ln in text.splitlines() if ln.strip().startswith("File \"") and any(p in ln for p in ours)]
    reports = [ln for ln in text.splitlines() if "epoch_grid.py" in ln and "Error" in ln
               or "could not add the Trainer axes" in ln or "Error creating UI for epoch" in ln]
    return frames + reports


class SavedOutputs:
    """Files the WebUI saves into its output folders (of the checkout under test) during a block, found by a
    unique seed in their names; removed afterwards with the folders the block created."""

    def __init__(self, webui, seed: int):
        opts = webui.get("/sdapi/v1/options")
        root = Path(os.environ["SD_WEBUI_DIR"])
        self.grid_save = opts["grid_save"]
        self.grids, self.samples = root / opts["outdir_txt2img_grids"], root / opts["outdir_txt2img_samples"]
        self.outputs = {self.grids, self.samples, self.grids.parent, self.samples.parent}
        self.seed = seed

    def __enter__(self):
        self.dirs_before = {d for d in self.outputs if d.exists()}
        self.dirs_before |= {d for top in self.outputs if top.exists() for d in top.rglob("*") if d.is_dir()}
        return self

    def files(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob(f"*-{self.seed}.png")) if folder.exists() else []

    def __exit__(self, *exc):
        for f in self.files(self.grids) + self.files(self.samples):
            f.unlink()
        created = {d for top in self.outputs if top.exists() for d in [top, *top.rglob("*")] if d.is_dir()}
        for d in sorted(created - self.dirs_before, key=lambda p: len(p.parts), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()


@pytest.fixture(scope="module")
def grid_run(webui, lora_config) -> dict:
    """A LoRA run with saves after epochs 1 and 2 and the final file (epoch 3): 4 samples per epoch, batch 2."""
    cfg = lora_config(RUN, 0, train={"epochs": 3, "batch_size": 2}, output={"save_every_epochs": 1})
    status = webui.wait_job(webui.post("/trainer/v1/jobs", cfg)["id"])
    assert status["state"] == "finished", status
    folder = webui.lora_dir / RUN
    assert [Path(p).name for p in status["saved"]] == [f"{stem}.safetensors" for stem in FILES]
    assert all((folder / f"{stem}.safetensors").is_file() for stem in FILES)
    return status


def _script_info(webui, name: str, img2img: bool = False) -> dict:
    infos = [s for s in webui.get("/sdapi/v1/script-info") if s["name"] == name and s["is_img2img"] == img2img]
    assert len(infos) == 1, [s["name"] for s in webui.get("/sdapi/v1/script-info")]
    return infos[0]


def test_the_script_is_listed_for_txt2img_and_img2img(webui):
    scripts = webui.get("/sdapi/v1/scripts")
    assert SCRIPT.lower() in scripts["txt2img"] and SCRIPT.lower() in scripts["img2img"]
    info = _script_info(webui, SCRIPT.lower())
    labels = [a["label"] for a in info["args"]]
    assert len(labels) == 11 and labels[0] == "Training run" and labels[2] == "Weights: the rows"
    assert info["args"][2]["value"] == "0.2-1.0 (+0.2)"
    assert info["args"][3]["choices"] == ["Nothing", "Prompts", "Seeds"]


def test_the_xyz_plot_has_the_trainer_axes(webui):
    for img2img in (False, True):
        axes = _script_info(webui, "x/y/z plot", img2img)["args"][0]["choices"]  # "X type"
        assert "Trainer: run epoch" in axes and "Trainer: LoRA weight" in axes
        assert axes.count("Trainer: run epoch") == 1  # registered once


@pytest.fixture(scope="module")
def first_grid(webui, grid_run) -> dict:
    return txt2img(webui, "thing", -1, grid_args())


def test_a_3x3_grid_is_made_of_its_cells(first_grid):
    r = first_grid
    grid, cells = r["pixels"][0], r["pixels"][1:]
    assert grid.shape == (3 * SIZE, 3 * SIZE, 3) and len(cells) == 9
    for k, cell in enumerate(cells):  # cells come in grid order: files across, weights down
        row, col = divmod(k, 3)
        assert cell.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(grid[row * SIZE:(row + 1) * SIZE, col * SIZE:(col + 1) * SIZE], cell)
    texts = r["info"]["infotexts"]
    assert len(texts) == 10 and r["info"]["index_of_first_image"] == 1
    expected = [(FILES[col], w) for w in ("0.5", "1", "1.5") for col in range(3)]
    for text, (stem, w) in zip(texts[1:], expected):
        assert f"<lora:{stem}:{w}>" in text and f"Trainer file: {stem}" in text and f"Trainer weight: {w}" in text
        assert "Lora hashes" in text and stem in text.split("Lora hashes")[1]
    assert "Script: Epoch × weight grid" in texts[0] and "Trainer file:" not in texts[0]
    assert f'Trainer run: "{LABEL}"' in texts[0] or f"Trainer run: {LABEL}" in texts[0]


def test_one_drawn_seed_for_every_cell(first_grid):
    seeds = first_grid["info"]["all_seeds"]
    assert len(seeds) == 10 and len(set(seeds)) == 1 and seeds[0] != -1
    assert first_grid["info"]["seed"] == seeds[0]


def test_cells_differ_across_epochs_and_weights(first_grid):
    cells = first_grid["pixels"][1:]
    distinct = {c.tobytes() for c in cells}
    assert len(distinct) == 9, "some cells are identical: a file or a weight had no effect"


def test_labels_are_drawn_around_the_same_cells(webui, first_grid):
    seed = first_grid["info"]["seed"]
    r = txt2img(webui, "thing", seed, grid_args(legend=True, cells=False))
    assert len(r["pixels"]) == 1
    labelled, plain = r["pixels"][0], first_grid["pixels"][0]
    pad_left = SIZE * 3 // 4  # the WebUI's draw_grid_annotations leaves 3/4 of a cell for row labels
    pad_top = labelled.shape[0] - plain.shape[0]
    assert labelled.shape[1] == plain.shape[1] + pad_left and pad_top > 0
    np.testing.assert_array_equal(labelled[pad_top:, pad_left:], plain)  # the same seed gives the same cells
    assert labelled[:pad_top].std() > 0 and labelled[pad_top:, :pad_left].std() > 0  # text in both margins


def test_a_seed_axis_adds_rows(webui, grid_run):
    r = txt2img(webui, "thing", 7, grid_args(files=[RUN], weights="1", third=("Seeds", "3, 4")))
    assert r["pixels"][0].shape == (2 * SIZE, SIZE, 3) and len(r["pixels"]) == 3
    assert r["info"]["all_seeds"][1:] == [3, 4]
    assert not np.array_equal(r["pixels"][1], r["pixels"][2])


def test_img2img_grid(webui, grid_run):
    init = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), 120, np.uint8)).save(init, format="PNG")
    body = {"init_images": [base64.b64encode(init.getvalue()).decode()], "denoising_strength": 0.8,
            "prompt": "thing", "steps": 2, "width": SIZE, "height": SIZE, "sampler_name": "Euler", "seed": 3,
            "script_name": SCRIPT, "script_args": grid_args(files=[FILES[0], RUN], weights="1")}
    r = webui.post("/sdapi/v1/img2img", body)
    pixels = [_pixels(b) for b in r["images"]]
    assert pixels[0].shape == (SIZE, 2 * SIZE, 3) and len(pixels) == 3
    assert not np.array_equal(pixels[1], pixels[2])
    texts = json.loads(r["info"])["infotexts"]
    assert f"<lora:{FILES[0]}:1>" in texts[1] and f"<lora:{RUN}:1>" in texts[2] and "Denoising strength" in texts[1]


def test_progress_and_interrupt_during_the_grid(webui, grid_run):
    result: dict = {}

    def generate():
        result["r"] = txt2img(webui, "thing", 11, grid_args(weights="0.2-1.0 (+0.2)"), steps=8)

    thread = threading.Thread(target=generate)
    thread.start()
    deadline = time.monotonic() + 300
    while True:
        progress = webui.get("/sdapi/v1/progress?skip_current_image=true")
        if progress["state"]["job_count"] == 15 and progress["state"]["job_no"] >= 1:
            break
        assert thread.is_alive() and time.monotonic() < deadline, progress
        time.sleep(0.2)
    assert progress["state"]["job"].startswith("Epoch × weight grid: image")
    assert 0 < progress["progress"] < 1
    webui.post("/sdapi/v1/interrupt")
    thread.join(300)
    r = result["r"]
    done = len(r["pixels"]) - 1
    assert 1 <= done < 15, done
    assert r["pixels"][0].shape == (5 * SIZE, 3 * SIZE, 3)  # the grid keeps its layout; missing cells are blank
    assert f"Trainer images: {done} of 15 (interrupted)" in r["info"]["infotexts"][0]
    after = txt2img(webui, "thing", 11, grid_args(files=[RUN], weights="1"))  # the next job runs normally
    assert len(after["pixels"]) == 2


def test_xyz_plot_with_the_trainer_axes(webui, grid_run):
    axes = _script_info(webui, "x/y/z plot")["args"][0]["choices"]
    x_type, y_type = axes.index("Trainer: run epoch"), axes.index("Trainer: LoRA weight")
    args = [x_type, f"{FILES[0]}, {FILES[1]}", [], y_type, "0.5, 1", [], 0, "", [],
            False, True, False, False, False, False, False, 0, True]
    seed = 424242
    with SavedOutputs(webui, seed):  # the X/Y/Z plot saves its grid even for the API
        r = webui.post("/sdapi/v1/txt2img", {"prompt": "thing", "steps": 2, "width": SIZE, "height": SIZE,
                                             "sampler_name": "Euler", "seed": seed, "script_name": "x/y/z plot",
                                             "script_args": args})
    texts = json.loads(r["info"])["infotexts"]
    assert len(r["images"]) == 5  # the grid and its 4 images
    prompts = sorted(t.splitlines()[0] for t in texts[1:])
    assert prompts == sorted(f"thing <lora:{stem}:{w}>" for stem in FILES[:2] for w in ("0.5", "1"))
    # the same images as our own grid's at the same seed
    ours = txt2img(webui, "thing", seed, grid_args(files=FILES[:2], weights="0.5, 1"))
    assert sorted(_pixels(b).tobytes() for b in r["images"][1:]) == sorted(p.tobytes() for p in ours["pixels"][1:])


def test_the_grid_is_saved_with_its_infotext(webui, grid_run):
    seed = 918273645
    with SavedOutputs(webui, seed) as out:
        if not out.grid_save:
            pytest.skip("the WebUI's 'Always save all generated image grids' setting is off")
        r = txt2img(webui, "thing", seed, grid_args(files=[RUN], weights="0.5, 1", legend=True), save_images=True)
        grids, cells = out.files(out.grids), out.files(out.samples)
        assert [p.name.split("-")[0] for p in grids] == ["epoch_grid"] and len(cells) == 2
        saved = Image.open(grids[0])
        assert saved.info["parameters"] == r["info"]["infotexts"][0]
        np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), r["pixels"][0])
        assert sorted(Image.open(c).info["parameters"] for c in cells) == sorted(r["info"]["infotexts"][1:])


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_keep_writes_the_preferred_weight_and_promotes_the_epoch(webui, grid_run):
    from safetensors.numpy import load_file

    folder = webui.lora_dir / RUN
    epoch2 = load_file(str(folder / f"{RUN}-000002.safetensors"))
    old_final = load_file(str(folder / f"{RUN}.safetensors"))
    r = txt2img(webui, "thing", 5, grid_args(keep=(f"{RUN}-000002", 0.7, True), mode="keep"))
    sidecar = json.loads((folder / f"{RUN}.json").read_text(encoding="utf-8"))
    assert sidecar == {"sd version": "SD1", "activation text": "thing", "preferred weight": 0.7}
    assert json.loads((folder / f"{RUN}-000002.json").read_text(encoding="utf-8"))["preferred weight"] == 0.7
    final = load_file(str(folder / f"{RUN}.safetensors"))
    assert final.keys() == epoch2.keys() and all(np.array_equal(final[k], epoch2[k]) for k in final)
    kept = load_file(str(folder / f"{RUN}-000003.safetensors"))  # the old final, under its epoch's name
    assert all(np.array_equal(kept[k], old_final[k]) for k in kept)

    info = r["info"]
    assert f"<lora:{RUN}:0.7>" in info["infotexts"][0]
    assert "Preferred weight 0.7" in info["extra_generation_params"]["Trainer kept"]
    loras = {x["name"]: x for x in webui.get("/sdapi/v1/loras")}  # listed at once, the alias is the run's name
    assert loras[RUN]["alias"] == RUN and loras[f"{RUN}-000003"]["alias"] == f"{RUN}-000003"
    # what the Lora card now inserts renders exactly as epoch 2 at that weight did
    epoch2_image = txt2img(webui, f"thing <lora:{RUN}-000002:0.7>", 5)["pixels"][0]
    np.testing.assert_array_equal(r["pixels"][0], epoch2_image)
    again = txt2img(webui, f"thing <lora:{RUN}:0.7>", 5)["pixels"][0]
    np.testing.assert_array_equal(again, epoch2_image)


def test_bad_arguments_are_answered_422_with_the_field(webui, grid_run):
    body = {"prompt": "thing", "steps": 2, "width": SIZE, "height": SIZE, "script_name": SCRIPT}
    r = webui.request("POST", "/sdapi/v1/txt2img", {**body, "script_args": grid_args(weights="0.2-1")})
    assert r.status == 422 and r.body["detail"].startswith("weights: '0.2-1' is a range without a step")
    r = webui.request("POST", "/sdapi/v1/txt2img", {**body, "script_args": ["LoRA: nope"]})
    assert r.status == 422 and r.body["detail"].startswith("run: no training run 'LoRA: nope'. Runs found: ")
    r = webui.request("POST", "/sdapi/v1/txt2img", {**body, "script_args": grid_args(keep=("", 1, False),
                                                                                     mode="keep")})
    assert r.status == 422 and r.body["detail"] == "keep_file: choose the file to keep"


def test_an_embedding_run_makes_a_grid_too(webui, dataset):
    name = "zqgridemb"
    body = {"method": "embedding",
            "data": {"train_dir": str(dataset), "resolution": SIZE, "min_bucket_side": SIZE, "max_bucket_side": 128},
            "embedding": {"vectors": 1, "init_text": "thing"}, "optim": {"lr": 0.05}, "train": {"max_steps": 2},
            "output": {"name": name, "save_every_epochs": 0, "save_every_steps": 1}}
    status = webui.wait_job(webui.post("/trainer/v1/jobs", body)["id"])
    assert status["state"] == "finished", status
    run = next(r for r in webui.get("/trainer/v1/runs") if r["kind"] == "embedding" and r["name"] == name)
    assert [f["stem"] for f in run["files"]] == [f"{name}-000001", name]
    args = [run["label"], [], "0.5, 1", "Nothing", "", False, True, "", 1.0, False, "grid"]
    r = txt2img(webui, f"a photo of {name}", seed=7, script_args=args)
    grid, cells = r["pixels"][0], r["pixels"][1:]
    assert grid.shape[:2] == (2 * SIZE, 2 * SIZE) and len(cells) == 4
    prompts = [t.splitlines()[0] for t in r["info"]["infotexts"][1:]]
    assert prompts == [f"a photo of ({name}-000001:0.5)", f"a photo of ({name}:0.5)", f"a photo of {name}-000001",
                       f"a photo of {name}"]  # files across, weights down; weight 1 = the plain name
    assert len({c.tobytes() for c in cells}) == 4


def test_log_has_no_errors_from_our_code(webui):
    assert our_errors_in_log(webui.log_text()) == []
