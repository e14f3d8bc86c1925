from __future__ import annotations

import numpy as np
import pytest
from helpers import gradient, save_image, truncate
from PIL import Image, ImageFile

from lib_train.data.images import ImageError, is_image_file, open_training_image, probe_image
from lib_train.errors import Problem, TrainerError


def test_probe_and_open_agree_on_size(tmp_path):
    for ext in ("png", "jpg", "webp", "bmp", "JPEG"):
        p = save_image(tmp_path / f"a.{ext}", (120, 70))
        assert probe_image(p) == (120, 70)
        im = open_training_image(p)
        assert (im.mode, im.size) == ("RGB", (120, 70))


def test_supported_extensions_case_insensitive():
    assert is_image_file("x/A.PNG") and is_image_file("b.JpEg") and is_image_file("c.webp")
    assert not is_image_file("d.gif") and not is_image_file("e.txt")


def test_exif_orientation_6_swaps_sides_and_rotates_pixels(tmp_path):
    arr = np.zeros((60, 100, 3), np.uint8)  # landscape 100x60, left half red
    arr[:, :50] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    p = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(p, exif=exif.tobytes(), quality=95)
    assert probe_image(p) == (60, 100)
    im = open_training_image(p)
    assert im.size == (60, 100)
    top, bottom = np.asarray(im)[5, 30], np.asarray(im)[95, 30]
    assert top[0] > 200 and top[1] < 60  # the original left (red) half is on top after rotating clockwise
    assert bottom[0] < 60


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_file_fails_at_probe(tmp_path, ext):
    p = truncate(save_image(tmp_path / f"cut.{ext}", (200, 150)))
    problem = probe_image(p)
    assert isinstance(problem, Problem)
    assert problem.where == str(p)
    assert "truncated" in problem.message and "re-export" in problem.message


def test_truncation_detected_even_if_someone_allowed_truncated_images(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    p = truncate(save_image(tmp_path / "cut.png", (200, 150)))
    assert isinstance(probe_image(p), Problem)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is restored


def test_not_an_image_zero_bytes_and_missing(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(np.random.default_rng(1).bytes(2000))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"
    for path, words in ((junk, "not an image"), (empty, "0 bytes"), (missing, "cannot be read")):
        with pytest.raises(ImageError) as err:
            open_training_image(path)
        assert str(path) in str(err.value) and words in str(err.value)
        assert isinstance(err.value, TrainerError)
        assert isinstance(probe_image(path), Problem)


def test_decompression_bomb_reported_with_the_limit(tmp_path, monkeypatch):
    p = save_image(tmp_path / "big.png", (100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 px > 2 × limit -> Pillow raises
    problem = probe_image(p)
    assert isinstance(problem, Problem) and "MAX_IMAGE_PIXELS" in problem.message and "downscale" in problem.message


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[:, :15] = (0, 0, 255, 255)  # opaque blue left, fully transparent right
    p = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(p)
    arr = np.asarray(open_training_image(p))
    assert tuple(arr[10, 5]) == (0, 0, 255)
    assert tuple(arr[10, 25]) == (255, 255, 255)


def test_palette_with_transparency_la_and_grayscale(tmp_path):
    pal = Image.fromarray(gradient(40, 30)).convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    Image.fromarray(gradient(40, 30)).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(gradient(40, 30)).convert("L").save(tmp_path / "l.jpg")
    for name in ("p.png", "la.png", "l.jpg"):
        im = open_training_image(tmp_path / name)
        assert (im.mode, im.size) == ("RGB", (40, 30))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(ramp).save(p)
    arr = np.asarray(open_training_image(p)).astype(int)
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255
    assert 100 < arr[32, 0, 0] < 156  # mid-grey in the middle, not white as a clipping conversion would give


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(gradient(50, 40)).convert("CMYK").save(p)
    im = open_training_image(p)
    assert (im.mode, im.size) == ("RGB", (50, 40))
