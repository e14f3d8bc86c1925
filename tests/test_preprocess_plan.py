"""Preprocessing without the WebUI (lib_train/data/preprocess_plan.py): option checks, the caption merge rule, the
source → destination mapping, the run loop with stand-in image operations, and uploads. The WebUI's own operations
are exercised in tests/webui/test_preprocess_webui.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, ImageOps

from helpers import save_image, truncate, write_caption
from lib_train.data import scan_dataset
from lib_train.data.preprocess_plan import DEBUG_FOLDER, Hooks, Operations, PreprocessOptions, default_dest, \
    make_plan, merge_caption, options_from_dict, run_plan, store_uploads, validate_options
from lib_train.errors import ConfigError, DatasetError


# ------------------------------------------------------------------------------------------------ helpers

def _opts(source: Path, **kw) -> PreprocessOptions:
    return PreprocessOptions(source_dir=str(source), **kw)


def _problems(o: PreprocessOptions) -> dict[str, str]:
    return {p.where: p.message for p in validate_options(o)}


def _fit(size=(64, 64)):
    return lambda im: ImageOps.fit(im, size, Image.Resampling.LANCZOS)


def _halves(im: Image.Image) -> list[Image.Image]:
    """A stand-in split: images at least twice as tall as wide become two 64×64 pieces."""
    if im.height < 2 * im.width:
        return []
    return [_fit()(im.crop((0, 0, im.width, im.height // 2))), _fit()(im.crop((0, im.height // 2, im.width,
                                                                                im.height)))]


def _ops(**captioners) -> Operations:
    return Operations(resize=_fit(), focal=lambda im: [_fit()(im), Image.new("RGB", im.size)],
                      auto=lambda im: None if im.width == im.height else _fit((128, 64))(im),
                      split=_halves, flip=ImageOps.mirror, captioners=captioners)


@pytest.fixture
def source(tmp_path) -> Path:
    """src/10_cat: a (96×64, caption), b (64×160, tall), a.jpg (same stem as a.png); src/2_dog/sub/c (80×80);
    d.png at the root; a hidden folder and a .gif that are not images of the dataset."""
    src = tmp_path / "src"
    save_image(src / "10_cat" / "a.png", (96, 64), seed=1)
    write_caption(src / "10_cat" / "a.txt", "cat, sitting")
    save_image(src / "10_cat" / "a.jpg", (96, 64), seed=2)
    save_image(src / "10_cat" / "b.png", (64, 160), seed=3)
    save_image(src / "2_dog" / "sub" / "c.png", (80, 80), seed=4)
    save_image(src / "d.png", (70, 90), seed=5)
    save_image(src / ".thumbs" / "t.png", (32, 32))
    (src / "10_cat" / "anim.gif").write_bytes(b"GIF89a")
    return src


# ------------------------------------------------------------------------------------------------ captions

@pytest.mark.parametrize("action, expected", [
    ("ignore", "old, tags"),
    ("prepend", "new caption, old, tags"),
    ("append", "old, tags, new caption"),
    ("overwrite", "new caption"),
])
def test_merge_caption_with_both(action, expected):
    assert merge_caption(" old, tags ", "new caption ", action) == expected


@pytest.mark.parametrize("action", ["ignore", "prepend", "append", "overwrite"])
def test_merge_caption_with_one_side_missing(action):
    assert merge_caption(None, "gen", action) == "gen"
    assert merge_caption("", "gen", action) == "gen"
    assert merge_caption("old", "", action) == "old"  # nothing generated: the existing caption is never lost
    assert merge_caption(None, "", action) == ""


def test_merge_caption_rejects_unknown_action():
    with pytest.raises(ValueError, match="keep"):
        merge_caption("a", "b", "keep")


# ------------------------------------------------------------------------------------------------ options

def test_options_from_dict_names_unknown_keys_and_bad_types():
    assert options_from_dict({"width": "768", "flip": "true", "source_dir": " /x "}) == \
        PreprocessOptions(width=768, flip=True, source_dir="/x")
    with pytest.raises(ConfigError) as e:
        options_from_dict({"widht": 512, "height": "tall", "split": 3})
    where = {p.where for p in e.value.problems}
    assert where == {"widht", "height", "split"}
    assert "known options" in str(e.value) and "'tall'" in str(e.value)
    with pytest.raises(ConfigError, match="JSON object"):
        options_from_dict(["not", "a", "dict"])


def test_value_checks_name_each_option(source):
    o = _opts(source, width=500, height=32, resize="stretch", existing_caption="keep", caption_extension=".png",
              split=True, split_overlap=0.95)
    p = _problems(o)
    assert "multiple of 8" in p["width"] and "496 or 504" in p["width"]
    assert "64–4096" in p["height"]
    assert "'stretch'" in p["resize"] and "crop, focal, auto, none" in p["resize"]
    assert "ignore, prepend, append, overwrite" in p["existing_caption"]
    assert "image extension" in p["caption_extension"]
    assert "0.0–0.9" in p["split_overlap"]
    p = _problems(_opts(source, resize="auto", auto_min_side=768, auto_max_side=512, auto_max_area=100 * 100))
    assert "larger than auto_max_side" in p["auto_min_side"]
    p = _problems(_opts(source, resize="auto", auto_max_area=256 * 256))
    assert "no size could be chosen" in p["auto_max_area"]
    p = _problems(_opts(source, resize="focal", focal_face_weight=0, focal_entropy_weight=0, focal_edges_weight=0))
    assert "weights are 0" in p["focal_face_weight"]
    assert _problems(_opts(source)) == {}


def test_folder_checks(source, tmp_path):
    assert "give the folder" in _problems(PreprocessOptions())["source_dir"]
    assert "does not exist" in _problems(_opts(tmp_path / "nope"))["source_dir"]
    assert "is a file" in _problems(_opts(source / "d.png"))["source_dir"]
    assert "source folder itself" in _problems(_opts(source, dest_dir=str(source)))["dest_dir"]
    inside = _problems(_opts(source, dest_dir=str(source / "out")))["dest_dir"]
    assert "inside the source folder" in inside and str(default_dest(source)) in inside
    around = _problems(_opts(source / "10_cat", dest_dir=str(source)))["dest_dir"]
    assert "unprocessed originals" in around
    assert default_dest(source) == tmp_path / "src-processed"
    assert _problems(_opts(source, dest_dir=str(tmp_path / "new" / "deeper"))) == {}


def test_a_non_empty_destination_needs_a_choice(source, tmp_path):
    dest = tmp_path / "out"
    save_image(dest / "10_cat" / "old.png")
    write_caption(dest / "10_cat" / "old.txt", "x")
    (dest / ".DS_Store").write_bytes(b"")
    stop = _problems(_opts(source, dest_dir=str(dest)))["dest_dir"]
    assert "not empty (3 files)" in stop and "'overwrite'" in stop and "'clear'" in stop
    assert _problems(_opts(source, dest_dir=str(dest), if_dest_exists="overwrite")) == {}
    assert _problems(_opts(source, dest_dir=str(dest), if_dest_exists="clear")) == {}
    (dest / "notes.docx").write_bytes(b"mine")
    clear = _problems(_opts(source, dest_dir=str(dest), if_dest_exists="clear"))["dest_dir"]
    assert "notes.docx" in clear and "1 other file" in clear
    (tmp_path / "empty" / "sub").mkdir(parents=True)  # only empty folders: as good as empty
    assert _problems(_opts(source, dest_dir=str(tmp_path / "empty"))) == {}


# ------------------------------------------------------------------------------------------------ plan

def test_plan_keeps_the_folder_structure_and_finds_captions(source, tmp_path):
    plan = make_plan(_opts(source))
    assert plan.dest == tmp_path / "src-processed"
    got = [(it.rel_dir.as_posix(), it.source.name, it.stem, it.caption_file.name if it.caption_file else None)
           for it in plan.items]
    assert got == [(".", "d.png", "d", None),
                   ("10_cat", "a.jpg", "a", "a.txt"),
                   ("10_cat", "a.png", "a-png", "a.txt"),  # two sources named a: the second keeps its extension
                   ("10_cat", "b.png", "b", None),
                   ("2_dog/sub", "c.png", "c", None)]
    assert any("anim.gif" in n for n in plan.notes)  # .thumbs/ is hidden: skipped without a word

    save_image(source / "10_cat" / "a-png.png", (96, 64))  # sorts first and takes the stem a.png would get
    stems = [it.stem for it in make_plan(_opts(source)).items if it.rel_dir.as_posix() == "10_cat"]
    assert stems == ["a-png", "a", "a-png_2", "b"]


def test_plan_refuses_with_every_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        make_plan(_opts(tmp_path / "empty", width=100))
    assert {p.where for p in e.value.problems} == {"width", "source_dir"}
    assert "no images" in str(e.value)


def test_size_not_a_multiple_of_64_is_a_note(source):
    plan = make_plan(_opts(source, width=520))
    assert any("width 520 is not a multiple of 64" in n for n in plan.notes)


# ------------------------------------------------------------------------------------------------ running

def _sizes(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in sorted(root.rglob("*.png")):
        with Image.open(p) as im:
            out[p.relative_to(root).as_posix()] = im.size
    return out


def test_run_crops_splits_flips_and_the_result_trains(source):
    plan = make_plan(_opts(source, split=True, flip=True))
    result = run_plan(plan, _ops())
    dest = plan.dest
    sizes = _sizes(dest)
    assert set(sizes.values()) == {(64, 64)}
    assert sorted(sizes) == sorted([
        "d.png", "d-flipped.png",
        "10_cat/a.png", "10_cat/a-flipped.png", "10_cat/a-png.png", "10_cat/a-png-flipped.png",
        "10_cat/b.png", "10_cat/b-flipped.png", "10_cat/b-2.png", "10_cat/b-2-flipped.png",  # b split in two
        "2_dog/sub/c.png", "2_dog/sub/c-flipped.png"])
    assert sorted(result.images) == sorted(sizes)
    assert (result.processed, result.total, result.interrupted) == (5, 5, False)
    # a.txt belonged to both sources named a; every output of them (flips too) carries it
    for name in ("a", "a-flipped", "a-png", "a-png-flipped"):
        assert (dest / "10_cat" / f"{name}.txt").read_text(encoding="utf-8") == "cat, sitting\n"
    assert sorted(result.captions) == sorted(f"10_cat/{n}.txt" for n in ("a", "a-flipped", "a-png", "a-png-flipped"))
    assert not (dest / "10_cat" / "b.txt").exists()
    # flipped copies really are mirrors of their piece
    with Image.open(dest / "10_cat" / "b-2.png") as im, Image.open(dest / "10_cat" / "b-2-flipped.png") as fl:
        assert ImageOps.mirror(im).tobytes() == fl.tobytes()

    scan = scan_dataset(dest)  # trainable at once: the repeat folders are kept
    assert scan.problems == []
    assert {s.key: (s.repeats, s.img_count) for s in scan.folders if s.img_count} == \
        {"10_cat": (10, 8), "2_dog": (2, 2), "src-processed": (1, 2)}


def test_generated_captions_merge_with_the_existing_one(source):
    calls = []

    def tagger(im: Image.Image) -> str:
        calls.append(im.size)
        return "tag1, tag2"

    plan = make_plan(_opts(source / "10_cat", dest_dir=str(source.parent / "o1"), existing_caption="append"))
    run_plan(plan, _ops(deepbooru=tagger, blip=lambda im: "a photo"))
    read = lambda n: (plan.dest / f"{n}.txt").read_text(encoding="utf-8").strip()  # noqa: E731
    assert read("a") == "cat, sitting, tag1, tag2, a photo"
    assert read("b") == "tag1, tag2, a photo"
    assert calls == [(64, 64)] * 3  # captioned after cropping

    calls.clear()
    plan = make_plan(_opts(source / "10_cat", dest_dir=str(source.parent / "o2"), existing_caption="ignore"))
    run_plan(plan, _ops(deepbooru=tagger))
    assert (plan.dest / "a.txt").read_text(encoding="utf-8").strip() == "cat, sitting"
    assert (plan.dest / "b.txt").read_text(encoding="utf-8").strip() == "tag1, tag2"
    assert len(calls) == 1  # images that keep their caption are not captioned at all


def test_pieces_are_captioned_one_by_one(source):
    seen = iter(["top", "bottom"])
    plan = make_plan(_opts(source / "10_cat", dest_dir=str(source.parent / "o"), split=True,
                           existing_caption="overwrite"))
    ops = _ops(blip=lambda im: "x" if max(im.getpixel((0, 0))) == 0 else next(seen))
    ops.resize = lambda im: Image.new("RGB", (64, 64))  # black: the stand-in captioner answers "x" for them
    run_plan(plan, ops)
    assert (plan.dest / "b.txt").read_text().strip() == "top"
    assert (plan.dest / "b-2.txt").read_text().strip() == "bottom"
    assert (plan.dest / "a.txt").read_text().strip() == "x"


def test_focal_debug_images_stay_out_of_the_dataset(source):
    plan = make_plan(_opts(source, resize="focal", focal_debug=True))
    ops = _ops()
    focal = ops.focal
    ops.focal = lambda im: plan.notes.append("face model fell back") or focal(im)  # a note added mid-run
    result = run_plan(plan, ops)
    assert result.notes.count("face model fell back") == 5
    assert f"{DEBUG_FOLDER}/10_cat/b.png" in result.images
    assert (plan.dest / DEBUG_FOLDER / "2_dog" / "sub" / "c.png").is_file()
    assert not any(c.startswith(DEBUG_FOLDER) for c in result.captions)
    assert len(scan_dataset(plan.dest).items) == 5  # the hidden debug folder is not read


def test_auto_crop_that_finds_no_size_keeps_the_image_with_a_note(source):
    plan = make_plan(_opts(source / "2_dog", dest_dir=str(source.parent / "o"), resize="auto"))
    result = run_plan(plan, _ops())
    assert _sizes(plan.dest) == {"sub/c.png": (80, 80)}
    assert any("sub/c.png: kept at 80×80" in n for n in result.notes)
    plan = make_plan(_opts(source / "10_cat", dest_dir=str(source.parent / "o2"), resize="none"))
    run_plan(plan, _ops())
    assert _sizes(plan.dest)["b.png"] == (64, 160)


def test_unreadable_images_are_left_out_with_a_note(source):
    truncate(source / "10_cat" / "a.jpg")
    (source / "d.png").write_bytes(b"")
    write_caption(source / "10_cat" / "b.txt", "caf\xe9", encoding="latin-1")
    result = run_plan(make_plan(_opts(source)), _ops())
    assert result.processed == 3 and result.total == 5
    note = next(n for n in result.notes if "could not be read" in n)
    assert "2 image(s)" in note and "10_cat/a.jpg" in note and "d.png" in note and "empty" in note
    assert any("b.txt" in n and "UTF-8" in n for n in result.notes)


def test_stop_and_skip_requests(source):
    progress = []
    hooks = Hooks(on_item=lambda i, n, text: progress.append((i, n, text)),
                  stop_requested=lambda: len(progress) >= 2)
    result = run_plan(make_plan(_opts(source)), _ops(), hooks)
    assert result.interrupted and result.processed == 2
    assert progress == [(0, 5, "d.png"), (1, 5, "10_cat/a.jpg")]  # no final "done" after a stop
    assert any("Interrupted after 2 of 5" in n for n in result.notes)
    assert sorted(result.images) == ["10_cat/a.png", "d.png"]

    skips = iter([False, True, False, False, False])
    shown = []
    hooks = Hooks(skip_requested=lambda: next(skips), on_image=shown.append)
    result = run_plan(make_plan(_opts(source, dest_dir=str(source.parent / "o"))), _ops(), hooks)
    assert not result.interrupted and result.processed == 4 and "10_cat/a.png" not in result.images
    assert len(shown) == len(result.images) == 4


def test_overwrite_and_clear(source, tmp_path):
    dest = tmp_path / "out"
    save_image(dest / "10_cat" / "old.png")
    write_caption(dest / "10_cat" / "a.txt", "stale")  # replaced
    write_caption(dest / "10_cat" / "b.txt", "stale")  # b has no caption now: removed with its image replaced
    run_plan(make_plan(_opts(source, dest_dir=str(dest), if_dest_exists="overwrite")), _ops())
    assert (dest / "10_cat" / "old.png").is_file()
    assert (dest / "10_cat" / "a.txt").read_text().strip() == "cat, sitting"
    assert not (dest / "10_cat" / "b.txt").exists()

    save_image(dest / "gone" / "x.png")
    run_plan(make_plan(_opts(source, dest_dir=str(dest), if_dest_exists="clear")), _ops())
    assert not (dest / "10_cat" / "old.png").exists() and not (dest / "gone").exists()
    assert sorted(_sizes(dest)) == ["10_cat/a-png.png", "10_cat/a.png", "10_cat/b.png", "2_dog/sub/c.png", "d.png"]


def test_result_is_plain_data(source):
    result = run_plan(make_plan(_opts(source / "2_dog", dest_dir=str(source.parent / "o"))), _ops())
    d = result.to_dict()
    assert d == dataclasses.asdict(result) and d["images"] == ["sub/c.png"] and d["output_dir"].endswith("o")


# ------------------------------------------------------------------------------------------------ uploads

@pytest.fixture
def uploads(tmp_path) -> Path:
    up = tmp_path / "gradio-tmp"
    save_image(up / "one.png", (80, 80), seed=1)
    save_image(up / "two.jpg", (80, 96), seed=2)
    write_caption(up / "one.txt", "one, red")
    (up / "tool.exe").write_bytes(b"MZ")
    (up / "fake.png").write_bytes(b"not a png at all")
    write_caption(up / "bad.txt", "caf\xe9", encoding="latin-1")
    return up


def test_uploads_go_into_a_repeat_folder_of_the_run(uploads, tmp_path):
    root = tmp_path / "data" / "trainer-datasets"
    gradio3 = SimpleNamespace(name=str(uploads / "two.jpg"), orig_name="/tmp/gradio/ab12/two.jpg")
    files = [str(uploads / "one.png"), (uploads / "one.txt", "one.txt"), gradio3, str(uploads / "tool.exe"),
             str(uploads / "fake.png"), str(uploads / "bad.txt"), (uploads / "one.png", "../../escape.png"),
             (uploads / "one.png", ".hidden.png"), (uploads / "one.png", "C:\\x\\y.png")]
    r = store_uploads(files, root, "mychar", repeats=10)
    folder = root / "mychar" / "10_mychar"
    assert r.run_dir == root / "mychar" and r.folder == folder
    assert sorted(p.name for p in folder.iterdir()) == ["one.png", "one.txt", "two.jpg"]
    assert (folder / "one.png").read_bytes() == (uploads / "one.png").read_bytes()
    rejected = {p.where: p.message for p in r.rejected}
    assert set(rejected) == {"tool.exe", "fake.png", "bad.txt", "../../escape.png", ".hidden.png", "C:\\x\\y.png"}
    assert "not an image" in rejected["tool.exe"] and "Pillow" in rejected["fake.png"]
    assert "UTF-8" in rejected["bad.txt"] and "path" in rejected["../../escape.png"]
    assert "hidden" in rejected[".hidden.png"]
    assert not (tmp_path / "data" / "escape.png").exists() and not (root / "escape.png").exists()
    scan = scan_dataset(r.run_dir)
    assert scan.problems == [] and [(s.key, s.repeats, s.img_count) for s in scan.folders] == [("10_mychar", 10, 2)]

    again = store_uploads([str(uploads / "one.png")], root, "mychar", repeats=10, concept="mychar")
    assert again.replaced == 1 and again.to_dict()["stored"] == [str(folder / "one.png")]


def test_upload_refusals(uploads, tmp_path):
    with pytest.raises(ConfigError) as e:
        store_uploads([str(uploads / "one.png")], tmp_path, "../up", repeats=0, concept="a/b")
    assert {p.where for p in e.value.problems} == {"run", "concept", "repeats"}
    with pytest.raises(DatasetError) as e:
        store_uploads([str(uploads / "tool.exe"), str(uploads / "one.txt")], tmp_path, "run")
    assert "tool.exe" in str(e.value) and "no image was stored" in str(e.value)
    assert not (tmp_path / "run").exists()
