"""Issue 12: dataset inputs — a folder of only GIFs names them and how to convert, ``.jfif`` is read as JPEG, a
scan stops at its limits (and never walks a file-system root or /proc), and under ``--hide-ui-dir-config`` links
out of the upload folder are refused like the folder itself."""

from __future__ import annotations

import os
import time

import pytest
from PIL import Image

from lib_train.data import open_training_image, scan_dataset
from lib_train.data.dataset import ScanLimits, confined_to

from helpers import make_images, save_image


def test_a_folder_of_only_gifs_names_them_and_how_to_convert(tmp_path):
    (tmp_path / "10_x").mkdir()
    for i in range(3):
        Image.new("RGB", (80, 80)).save(tmp_path / "10_x" / f"a{i}.gif")
    scan = scan_dataset(tmp_path)
    [problem] = [p for p in scan.problems if p.where == str(tmp_path)]
    assert "no images that can be read" in problem.message
    assert "10_x/a0.gif" in problem.message and ".gif" in problem.message
    assert "convert them to PNG or JPEG" in problem.message


def test_gifs_next_to_images_are_a_warning_naming_them(tmp_path):
    make_images(tmp_path / "10_x", n=1)
    Image.new("RGB", (80, 80)).save(tmp_path / "10_x" / "b.gif")
    scan = scan_dataset(tmp_path)
    assert not scan.problems and len(scan.items) == 1
    assert any("10_x/b.gif" in w.message and "ignored" in w.message for w in scan.warnings)


def test_jfif_files_are_read_as_jpeg(tmp_path):
    path = save_image(tmp_path / "10_x" / "photo.jpg", (96, 80))
    jfif = path.rename(path.with_suffix(".jfif"))
    scan = scan_dataset(tmp_path)
    assert not scan.problems
    assert [(it.path.name, it.width, it.height) for it in scan.items] == [("photo.jfif", 96, 80)]
    assert open_training_image(jfif).size == (96, 80)


def test_a_file_system_root_and_system_folders_are_refused_at_once():
    for root, needle in (("/", "root of a file system"), ("/proc", "system folder /proc")):
        started = time.monotonic()
        scan = scan_dataset(root)
        assert time.monotonic() - started < 5
        assert [p.message for p in scan.problems if needle in p.message], scan.problems[:3]
        assert not scan.items


def test_a_scan_stops_at_its_limits_and_says_so(tmp_path):
    for i in range(12):
        (tmp_path / f"d{i}").mkdir()
    make_images(tmp_path / "10_x", n=3)
    scan = scan_dataset(tmp_path, limits=ScanLimits(max_entries=10))
    assert any("the scan stopped after more than 10 files and folders" in p.message for p in scan.problems)
    assert not scan.items
    scan = scan_dataset(tmp_path, limits=ScanLimits(max_images=2))
    assert any("more than 2 images" in p.message for p in scan.problems)
    scan = scan_dataset(tmp_path, limits=ScanLimits(max_seconds=-1))
    assert any("seconds of walking" in p.message for p in scan.problems)
    assert not scan_dataset(tmp_path).problems  # within the default limits


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks here")
def test_links_out_of_the_allowed_root_are_refused_when_confined(tmp_path):
    uploads, outside = tmp_path / "uploads", tmp_path / "outside"
    make_images(uploads / "run" / "10_x", n=1)
    secret = save_image(outside / "secret.png", (96, 96))
    make_images(outside / "folder", n=2, prefix="o")
    (uploads / "run" / "10_x" / "link.png").symlink_to(secret)
    (uploads / "run" / "10_x" / "linked").symlink_to(outside / "folder", target_is_directory=True)
    (uploads / "run" / "10_x" / "inner.png").symlink_to(uploads / "run" / "10_x" / "img0.png")  # stays inside
    free = scan_dataset(uploads / "run")
    assert len(free.items) == 5 and not free.problems  # headless: links are followed
    with confined_to([str(uploads)]):
        scan = scan_dataset(uploads / "run")
    assert sorted(it.path.name for it in scan.items) == ["img0.png", "inner.png"]
    [problem] = scan.problems
    assert "2 link(s) lead out of the folders this WebUI allows" in problem.message
    assert "link.png" in problem.message and "linked" in problem.message
    assert str(outside) not in problem.message  # the target is never revealed


def test_preprocessing_refuses_a_root_or_system_folder_as_source():
    from lib_train.data.preprocess_plan import PreprocessOptions, make_plan
    from lib_train.errors import ConfigError

    for source, needle in (("/", "root of a file system"), ("/proc", "system folder /proc")):
        with pytest.raises(ConfigError) as e:
            make_plan(PreprocessOptions(source_dir=source))
        assert [p.where for p in e.value.problems] == ["source_dir"] and needle in str(e.value)


def test_preprocessing_stops_at_the_scan_limits(tmp_path, monkeypatch):
    from lib_train.data import preprocess_plan
    from lib_train.errors import ConfigError

    make_images(tmp_path / "src" / "a", n=4)
    monkeypatch.setattr(preprocess_plan, "SCAN_LIMITS", ScanLimits(max_images=2))
    with pytest.raises(ConfigError) as e:
        preprocess_plan.make_plan(preprocess_plan.PreprocessOptions(source_dir=str(tmp_path / "src")))
    assert "the listing stopped after more than 2 images" in str(e.value)
    assert "no images" not in str(e.value)
