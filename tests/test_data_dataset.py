from __future__ import annotations

import numpy as np
import pytest
from helpers import save_image, truncate, write_caption
from PIL import Image

from lib_train.data.dataset import read_caption, scan_dataset
from lib_train.errors import DatasetError


def _where(problems):
    return [p.where for p in problems]


def _only(problems, text):
    found = [p for p in problems if text in p.where]
    assert len(found) == 1, problems
    return found[0]


def test_repeat_folders_found_recursively(tmp_path):
    save_image(tmp_path / "10_mychar" / "a.png")
    write_caption(tmp_path / "10_mychar" / "a.txt", "mychar, red hair")
    save_image(tmp_path / "10_mychar" / "closeups" / "b.jpg")
    save_image(tmp_path / "group" / "3_style" / "deep" / "c.webp")
    scan = scan_dataset(tmp_path)
    assert scan.problems == []
    by_name = {it.path.name: it for it in scan.items}
    assert (by_name["a.png"].repeats, by_name["b.jpg"].repeats, by_name["c.webp"].repeats) == (10, 10, 3)
    assert by_name["b.jpg"].subset_dir == tmp_path / "10_mychar"  # nearest N_name folder above
    assert by_name["a.png"].caption == "mychar, red hair"
    assert scan.subsets == {"10_mychar": {"n_repeats": 10, "img_count": 2}, "group/3_style": {"n_repeats": 3,
                                                                                             "img_count": 1}}
    assert {s.concept for s in scan.folders} == {"mychar", "style"}
    assert scan.num_train_images == 10 * 2 + 3
    assert not any("repeat folder" in w.message and "default" in w.message for w in scan.warnings)


def test_images_outside_repeat_folders_use_default_repeats_with_warning(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "misc" / "b.png")
    write_caption(tmp_path / "a.txt", "x")
    write_caption(tmp_path / "misc" / "b.txt", "x")
    scan = scan_dataset(tmp_path, default_repeats=2)
    assert scan.problems == []
    assert [it.repeats for it in scan.items] == [2, 2]
    assert scan.subsets == {tmp_path.name: {"n_repeats": 2, "img_count": 2}}
    (warning,) = scan.warnings
    assert warning.where == str(tmp_path)
    assert "'misc'" in warning.message and "default of 2" in warning.message and "10_mychar" in warning.message


def test_selected_folder_name_never_counts_as_repeats(tmp_path):
    root = tmp_path / "2024_photos"
    save_image(root / "a.png")
    write_caption(root / "a.txt", "thing")
    scan = scan_dataset(root)
    assert scan.problems == [] and scan.items[0].repeats == 1
    assert scan.subsets == {"2024_photos": {"n_repeats": 1, "img_count": 1}}
    (warning,) = scan.warnings
    assert "select its parent folder" in warning.message


@pytest.mark.parametrize("name", ["0_x", "-3_x", "00_x"])
def test_zero_or_negative_repeats_is_an_error(tmp_path, name):
    save_image(tmp_path / name / "a.png")
    save_image(tmp_path / "5_ok" / "b.png")
    scan = scan_dataset(tmp_path)
    problem = _only(scan.problems, name)
    assert problem.where == str(tmp_path / name) and "never be used" in problem.message and "1_x" in problem.message
    assert [it.path.name for it in scan.items] == ["b.png"]


@pytest.mark.parametrize("name", ["10x", "_x", "10_", "10 x"])
def test_malformed_repeat_names_warn(tmp_path, name):
    save_image(tmp_path / name / "a.png")
    scan = scan_dataset(tmp_path)
    assert scan.problems == []
    assert any(w.where == str(tmp_path / name) and "N_name" in w.message for w in scan.warnings)
    assert scan.items[0].repeats == 1


def test_empty_training_folder(tmp_path):
    scan = scan_dataset(tmp_path)
    (problem,) = scan.problems
    assert problem.where == str(tmp_path) and "no images" in problem.message and "10_mychar" in problem.message
    with pytest.raises(DatasetError) as err:
        scan.raise_if_problems()
    assert str(tmp_path) in str(err.value)


def test_folder_with_only_captions(tmp_path):
    write_caption(tmp_path / "10_a" / "a.txt", "x")
    write_caption(tmp_path / "10_a" / "b.txt", "y")
    (problem,) = scan_dataset(tmp_path).problems
    assert "2 caption file(s)" in problem.message and "put the images next to their captions" in problem.message


def test_empty_repeat_folder_next_to_a_good_one_warns(tmp_path):
    save_image(tmp_path / "10_a" / "a.png")
    (tmp_path / "5_empty").mkdir()
    write_caption(tmp_path / "3_captions_only" / "x.txt", "x")
    scan = scan_dataset(tmp_path)
    assert scan.problems == []
    assert _only(scan.warnings, "5_empty").message.startswith("this repeat folder holds no images")
    assert _only(scan.warnings, "3_captions_only")


def test_missing_or_file_path(tmp_path):
    f = save_image(tmp_path / "a.png")
    missing = scan_dataset(tmp_path / "nope")
    assert missing.problems[0].where == str(tmp_path / "nope") and "does not exist" in missing.problems[0].message
    as_file = scan_dataset(f)
    assert "is a file, not a folder" in as_file.problems[0].message


def test_broken_images_are_problems_and_excluded(tmp_path):
    d = tmp_path / "2_x"
    save_image(d / "good.png")
    (d / "junk.png").write_bytes(np.random.default_rng(0).bytes(500))
    truncate(save_image(d / "cut.png", (200, 160)))
    truncate(save_image(d / "cut.jpg", (200, 160)))
    (d / "zero.png").write_bytes(b"")
    save_image(d / "dot.png", (1, 1))
    save_image(d / "small.png", (40, 100))
    scan = scan_dataset(tmp_path, min_side=64)
    assert [it.path.name for it in scan.items] == ["good.png"]
    messages = {p.where.rsplit("/", 1)[-1]: p.message for p in scan.problems}
    assert set(messages) == {"junk.png", "cut.png", "cut.jpg", "zero.png", "dot.png", "small.png"}
    assert "truncated" in messages["cut.png"] and "truncated" in messages["cut.jpg"]
    assert "1×1" in messages["dot.png"]
    assert "40×100" in messages["small.png"] and "64 px" in messages["small.png"]
    err = DatasetError(scan.problems)
    assert all(str(d / n) in str(err) for n in messages)


def test_scan_size_is_exif_oriented(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "1_x" / "rot.jpg"
    p.parent.mkdir()
    Image.new("RGB", (100, 70), "white").save(p, exif=exif.tobytes())
    (item,) = scan_dataset(tmp_path).items
    assert (item.width, item.height) == (70, 100)


def test_caption_encodings(tmp_path):
    d = tmp_path / "1_x"
    for stem, raw in (("bom8", b"\xef\xbb\xbfcaf\xc3\xa9, tag"), ("utf16le", "café, tag".encode("utf-16")),
                      ("utf16be", b"\xfe\xff" + "café, tag".encode("utf-16-be")), ("latin1", "café".encode("latin-1")),
                      ("nul", "ab".encode("utf-16-le"))):
        save_image(d / f"{stem}.png")
        (d / f"{stem}.txt").write_bytes(raw)
    scan = scan_dataset(tmp_path)
    captions = {it.path.stem: it.caption for it in scan.items}
    assert captions == {"bom8": "café, tag", "utf16le": "café, tag", "utf16be": "café, tag"}
    bad = {p.where: p.message for p in scan.problems}
    assert set(bad) == {str(d / "latin1.txt"), str(d / "nul.txt")}
    assert all("save it as UTF-8" in m for m in bad.values())
    assert "0xe9" in bad[str(d / "latin1.txt")]


def test_multi_line_caption_joined_and_missing_captions_warned(tmp_path):
    d = tmp_path / "1_x"
    write_caption(d / "a.txt", "  first line \n\n second, tags \r\n")
    assert read_caption(d / "a.txt") == "first line, second, tags"
    for i in range(7):
        save_image(d / f"img{i}.png")
    scan = scan_dataset(tmp_path)
    (warning,) = scan.warnings
    assert "7 image(s) have no caption file" in warning.message and "1_x/img0.png" in warning.message
    assert "…" in warning.message and "img5.png" not in warning.message and "'<image name>.txt'" in warning.message
    assert all(it.caption == "x" and not it.has_caption_file for it in scan.items)  # kohya: the concept name


def test_missing_caption_outside_repeat_folder_is_empty(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "3_sks dog" / "b.png")
    assert {it.path.name: it.caption for it in scan_dataset(tmp_path).items} == {"a.png": "", "b.png": "sks dog"}


def test_custom_caption_extension(tmp_path):
    save_image(tmp_path / "1_x" / "a.png")
    write_caption(tmp_path / "1_x" / "a.caption", "hello")
    write_caption(tmp_path / "1_x" / "a.txt", "wrong")
    assert scan_dataset(tmp_path, caption_extension="caption").items[0].caption == "hello"


def test_hidden_files_and_folders_skipped(tmp_path):
    save_image(tmp_path / "1_x" / "a.png")
    (tmp_path / "1_x" / ".b.png").write_bytes(b"junk")
    (tmp_path / ".thumbs" / "1_y").mkdir(parents=True)
    (tmp_path / ".thumbs" / "1_y" / "c.png").write_bytes(b"junk")
    scan = scan_dataset(tmp_path)
    assert scan.problems == [] and [it.path.name for it in scan.items] == ["a.png"]


def test_unsupported_formats_warned(tmp_path):
    save_image(tmp_path / "1_x" / "a.png")
    Image.new("RGB", (80, 80)).save(tmp_path / "1_x" / "anim.gif")
    scan = scan_dataset(tmp_path)
    assert any("anim.gif" in w.message and "PNG or JPEG" in w.message for w in scan.warnings)


def test_regularization_samples_cycle_up_to_train_samples(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    for i in range(3):
        save_image(train / "10_char" / f"t{i}.png")
    for i in range(4):
        save_image(reg / "1_person" / f"r{i}.png")
    scan = scan_dataset(train, reg_dir=reg)
    assert scan.problems == []
    assert scan.num_train_images == 30 and scan.num_reg_images == 4
    assert [it.samples_per_epoch for it in scan.reg_items] == [8, 8, 7, 7]  # 4 + 26 one by one, in order
    assert scan.num_reg_samples == 30 and scan.samples_per_epoch == 60
    assert scan.reg_subsets == {"1_person": {"n_repeats": 1, "img_count": 4}}
    assert scan.subsets == {"10_char": {"n_repeats": 10, "img_count": 3}}


def test_surplus_regularization_images_unused_with_warning(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    for i in range(2):
        save_image(train / "1_char" / f"t{i}.png")
    for i in range(3):
        save_image(reg / "5_person" / f"r{i}.png")
    scan = scan_dataset(train, reg_dir=reg)
    assert [it.samples_per_epoch for it in scan.reg_items] == [5, 0, 0]
    (warning,) = [w for w in scan.warnings if "not used" in w.message]
    assert warning.where == str(reg)
    assert "2 of 3 regularization images are not used" in warning.message


def test_overlapping_reg_and_train_folders(tmp_path):
    save_image(tmp_path / "1_x" / "a.png")
    scan = scan_dataset(tmp_path, reg_dir=tmp_path / "1_x")
    assert any("overlap" in p.message and p.where == str(tmp_path / "1_x") for p in scan.problems)


def test_tag_frequency_shape(tmp_path):
    d = tmp_path / "10_mychar"
    for stem, caption in (("a", "MyChar, red hair, smile"), ("b", "mychar,  red hair ,"), ("c", "")):
        save_image(d / f"{stem}.png")
        write_caption(d / f"{stem}.txt", caption)
    save_image(tmp_path / "2_bg" / "x.png")
    write_caption(tmp_path / "2_bg" / "x.txt", "forest")
    freq = scan_dataset(tmp_path).tag_frequency()
    assert freq == {"10_mychar": {"mychar": 2, "red hair": 2, "smile": 1}, "2_bg": {"forest": 1}}


def test_invalid_arguments_are_problems(tmp_path):
    save_image(tmp_path / "1_x" / "a.png")
    scan = scan_dataset(tmp_path, caption_extension=".png", default_repeats=0)
    assert set(_where(scan.problems)) == {"caption_extension", "default_repeats"}
