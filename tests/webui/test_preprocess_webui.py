"""Dataset preprocessing in a real AUTOMATIC1111 WebUI (lib_train/webui/preprocess.py), through
``POST /trainer/v1/preprocess``: the WebUI's own split / auto-sized crop / flip scripts, autocrop and interrogators on
a small folder of images of different sizes, ``shared.state`` Interrupt, and the refusals (bad options, a
non-empty destination, captioning models that cannot be downloaded on this offline machine).

Skipped unless ``SD_WEBUI_DIR`` names a WebUI checkout (see tests/webui/conftest.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_train.data import scan_dataset

ROUTE = "/trainer/v1/preprocess"


def _save(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """10_thing: wide 300×200 (green middle, red/blue 50 px sides), tall 256×1024, big.jpg 1024×768 with a
    caption, small 100×150; 2_other: sq.webp 640×640."""
    src = tmp_path_factory.mktemp("pp") / "src"
    wide = np.zeros((200, 300, 3), dtype=np.uint8)
    wide[:, :50] = (255, 0, 0)
    wide[:, 50:250] = (0, 255, 0)
    wide[:, 250:] = (0, 0, 255)
    (src / "10_thing").mkdir(parents=True)
    Image.fromarray(wide).save(src / "10_thing" / "wide.png")
    _save(src / "10_thing" / "tall.png", (256, 1024), 1)
    _save(src / "10_thing" / "big.jpg", (1024, 768), 2)
    (src / "10_thing" / "big.txt").write_text("a big photo", encoding="utf-8")
    _save(src / "10_thing" / "small.png", (100, 150), 3)
    _save(src / "2_other" / "sq.webp", (640, 640), 4)
    return src


def _run(webui, **options):
    r = webui.request("POST", ROUTE, options)
    if r.status in (404, 405):
        pytest.fail(f"{ROUTE} is not registered in lib_train/webui/api.py (preprocess.preprocess_route)")
    return r


def _ok(webui, **options) -> dict:
    r = _run(webui, **options)
    assert r.status == 200, f"{r.status}: {r.body}\n{webui.log_tail()}"
    return r.body


def _sizes(root: Path, pattern: str = "*.png", *, hidden: bool = False) -> dict[str, tuple[int, int]]:
    """Image sizes under ``root`` by relative path; files in hidden folders (``.focal-debug``) only with ``hidden``."""
    out = {}
    for p in sorted(root.rglob(pattern)):
        if not hidden and any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        with Image.open(p) as im:
            out[p.relative_to(root).as_posix()] = im.size
    return out


def test_crop_split_flip(webui, source, tmp_path):
    dest = tmp_path / "crop"
    r = _ok(webui, source_dir=str(source), dest_dir=str(dest), width=256, height=256, resize="crop", split=True,
            flip=True)
    assert r["output_dir"] == str(dest) and (r["processed"], r["total"], r["interrupted"]) == (5, 5, False)
    sizes = _sizes(dest)
    assert sorted(r["images"]) == sorted(sizes)
    assert set(sizes.values()) == {(256, 256)}
    shaped = ["10_thing/wide", "10_thing/big", "10_thing/small", "2_other/sq", "10_thing/tall",
              *(f"10_thing/tall-{k}" for k in range(2, 6))]  # 256×1024 at 256×256, overlap 0.2: 5 pieces
    assert sorted(sizes) == sorted([f"{s}.png" for s in shaped] + [f"{s}-flipped.png" for s in shaped])
    with Image.open(dest / "10_thing" / "wide.png") as im:  # scaled to cover, the middle cut: no red/blue sides
        left, right = np.asarray(im)[128, 8], np.asarray(im)[128, 247]
    assert left[1] > 200 and left[0] < 40 and right[1] > 200 and right[2] < 40
    with Image.open(dest / "10_thing" / "wide.png") as im, Image.open(dest / "10_thing" / "wide-flipped.png") as fl:
        assert np.array_equal(np.asarray(im)[:, ::-1], np.asarray(fl))
    # the existing caption goes with every output of its image; the dataset is trainable as it is
    assert sorted(r["captions"]) == ["10_thing/big-flipped.txt", "10_thing/big.txt"]
    assert (dest / "10_thing" / "big-flipped.txt").read_text(encoding="utf-8").strip() == "a big photo"
    scan = scan_dataset(dest)
    assert scan.problems == []
    assert {s.key: (s.repeats, s.img_count) for s in scan.folders} == {"10_thing": (10, 16), "2_other": (2, 2)}


def test_crop_with_a_webui_upscaler(webui, source, tmp_path):
    """A named upscaler enlarges small images through the WebUI's Upscale script; "Nearest" makes no new colours,
    which proves it (not a Lanczos resample) made the pixels."""
    dest = tmp_path / "nearest"
    _ok(webui, source_dir=str(source / "10_thing"), dest_dir=str(dest), width=256, height=256, upscaler="Nearest")
    assert set(_sizes(dest).values()) == {(256, 256)}
    with Image.open(source / "10_thing" / "small.png") as src, Image.open(dest / "small.png") as out:
        colours = {tuple(c) for c in np.asarray(src.convert("RGB")).reshape(-1, 3)}
        assert {tuple(c) for c in np.asarray(out).reshape(-1, 3)} <= colours
    r = _run(webui, source_dir=str(source), dest_dir=str(tmp_path / "x"), upscaler="No Such Upscaler")
    assert r.status == 422 and r.body["detail"][0]["loc"] == ["body", "upscaler"]
    assert "Lanczos" in r.body["detail"][0]["msg"]  # the names this WebUI has are listed


def test_auto_sized_crop(webui, source, tmp_path):
    dest = tmp_path / "auto"
    r = _ok(webui, source_dir=str(source), dest_dir=str(dest), resize="auto", auto_min_side=384,
            auto_max_side=768, auto_max_area=640 * 640, auto_threshold=0.1)
    sizes = _sizes(dest)
    assert sizes["10_thing/wide.png"] == (768, 512)  # 3:2 exactly, the largest area allowed
    assert sizes["10_thing/small.png"] == (512, 768)
    assert sizes["10_thing/tall.png"] == (256, 1024)  # 1:4 fits no size within 10 %: kept, with a note
    assert any("tall.png: kept at 256×1024" in n for n in r["notes"])
    for name, (w, h) in sizes.items():
        if name != "10_thing/tall.png":
            assert w % 64 == 0 and h % 64 == 0 and 384 <= min(w, h) and max(w, h) <= 768 and w * h <= 640 * 640


def test_focal_point_crop(webui, source, tmp_path):
    dest = tmp_path / "focal"
    r = _ok(webui, source_dir=str(source / "10_thing"), dest_dir=str(dest), width=192, height=256, resize="focal",
            focal_debug=True)
    assert _sizes(dest, "[!.]*.png") == {"big.png": (192, 256), "small.png": (192, 256), "tall.png": (192, 256),
                                         "wide.png": (192, 256)}
    assert sorted(p.name for p in (dest / ".focal-debug").iterdir()) == ["big.png", "small.png", "tall.png",
                                                                         "wide.png"]
    face_model = Path(os.environ["SD_WEBUI_DIR"]) / "models" / "opencv" / "face_detection_yunet_2023mar.onnx"
    if not face_model.exists():  # offline: one note, no traceback per image
        assert sum("Haar cascades" in n for n in r["notes"]) == 1


@pytest.mark.parametrize("option, model, folder", [("caption_deepbooru", "DeepBooru", "torch_deepdanbooru"),
                                                   ("caption_blip", "BLIP", "BLIP")])
def test_captioning_without_its_model_is_a_clear_refusal(webui, source, tmp_path, option, model, folder):
    models = Path(os.environ["SD_WEBUI_DIR"]) / "models" / folder
    if models.is_dir() and any(models.iterdir()):
        pytest.skip(f"{model} is downloaded in this WebUI; the refusal is for a WebUI without it")
    dest = tmp_path / "cap"
    r = _run(webui, source_dir=str(source), dest_dir=str(dest), **{option: True})
    assert r.status == 409, r.body
    text = r.body["detail"]
    assert text.startswith(f"{model} captions are not available") and "internet connection" in text
    assert str(models) in text and f"turn {model} captions off" in text and "Traceback" not in text
    assert not dest.exists()  # refused before anything was written


def test_existing_caption_kept_when_nothing_is_generated(webui, source, tmp_path):
    dest = tmp_path / "keep"
    _ok(webui, source_dir=str(source / "10_thing"), dest_dir=str(dest), resize="none", existing_caption="overwrite")
    assert (dest / "big.txt").read_text(encoding="utf-8").strip() == "a big photo"
    assert _sizes(dest)["big.png"] == (1024, 768)


def test_refusals_name_the_option(webui, source, tmp_path):
    r = _run(webui, source_dir=str(source), dest_dir=str(source / "10_thing" / "out"), widht=512, width=500)
    assert r.status == 422
    where = {tuple(d["loc"]): d["msg"] for d in r.body["detail"]}
    assert set(where) == {("body", "widht")}  # unknown keys are reported before values are checked
    r = _run(webui, source_dir=str(source), dest_dir=str(source / "10_thing" / "out"), width=500)
    where = {tuple(d["loc"]): d["msg"] for d in r.body["detail"]}
    assert r.status == 422 and set(where) == {("body", "width"), ("body", "dest_dir")}
    assert "multiple of 8" in where[("body", "width")] and "inside the source" in where[("body", "dest_dir")]
    assert not (source / "10_thing" / "out").exists()

    dest = tmp_path / "again"
    _ok(webui, source_dir=str(source / "2_other"), dest_dir=str(dest))
    r = _run(webui, source_dir=str(source / "2_other"), dest_dir=str(dest))
    assert r.status == 422 and "not empty" in r.body["detail"][0]["msg"]
    assert _ok(webui, source_dir=str(source / "2_other"), dest_dir=str(dest), if_dest_exists="clear")["images"] == \
        ["sq.png"]


def test_the_webui_interrupt_stops_a_run(webui, tmp_path):
    src = tmp_path / "many" / "1_x"
    for i in range(60):
        _save(src / f"{i:02d}.png", (768, 768), i)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=_run(webui, source_dir=str(src.parent),
                                                                  dest_dir=str(tmp_path / "out"), flip=True)))
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = webui.get("/sdapi/v1/progress?skip_current_image=true")["state"]
        if state["job_count"] == 60 and state["job_no"] >= 2:
            break
        time.sleep(0.05)
    webui.post("/sdapi/v1/interrupt")
    thread.join(timeout=300)
    r = result["r"]
    assert r.status == 200, r.body
    body = r.body
    assert body["interrupted"] and 2 <= body["processed"] < 60, body
    assert len(body["images"]) == 2 * body["processed"]
    assert any("Interrupted after" in n for n in body["notes"])
