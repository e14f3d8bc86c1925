"""Opening training images: one decoder path for the scan and for training, so both agree on size and content.

* ``open_training_image`` returns the RGB pixels training sees: EXIF orientation applied
  (``ImageOps.exif_transpose``), transparency composited on white, palette / 16-bit / CMYK / grayscale converted.
* ``probe_image`` is the scan's check: it decodes the whole file (a truncated file fails here, not at step 500) and
  returns the oriented ``(width, height)`` or a :class:`Problem`. JPEGs are decoded in Pillow's draft mode (DCT
  scaling), which still reads every byte of the stream but costs a fraction of a full decode.

Pillow's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) stays on; an image past it is reported with its size.
No torch here: the WebUI tab uses this module for a quick scan.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import Problem, TrainerError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp")
"""Extensions the scan picks up (compared lower-cased). ``.jfif`` is a JPEG under another name (what browsers save
some downloads as); Pillow reads it by its content like any JPEG."""

_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90° (width and height exchange)
_WHITE = (255, 255, 255)
_strict_lock = threading.Lock()
_strict_users = 0  # decodes in progress that need strict mode (guarded by _strict_lock)
_saved_flag = False  # ImageFile.LOAD_TRUNCATED_IMAGES as it was before the first of them


class ImageError(TrainerError):
    """An image file that cannot be used; ``path`` is the file, ``detail`` the reason and the fix."""

    def __init__(self, path: Path, detail: str):
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make Pillow raise on truncated data while we decode, even if another module set
    ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` process-wide (which would fill the missing part with grey silently).
    The previous value is restored when the last concurrent decode ends; decodes themselves run outside the lock."""
    global _strict_users, _saved_flag
    with _strict_lock:
        if _strict_users == 0:
            _saved_flag = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_users += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_users -= 1
            if _strict_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_flag


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a malformed EXIF block: treat the image as not rotated
        return 1


def _decode(path: Path, *, draft: bool) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode ``path``; return the loaded image and its oriented (width, height).

    Raises ImageError naming the file and the fix for every way a user's file can fail.
    """
    try:
        size_bytes = path.stat().st_size
    except OSError as e:
        raise ImageError(path, f"cannot be read ({e.strerror or e}); check that the file exists and is "
                               "readable") from e
    if size_bytes == 0:
        raise ImageError(path, "the file is empty (0 bytes); replace it with the real image or delete it")
    try:
        with _strict_decoding(), Image.open(path) as im:
            width, height = im.size
            if draft and im.format == "JPEG":
                im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            im.load()
    except Image.DecompressionBombError as e:
        raise ImageError(
            path,
            f"the image is too large for Pillow's safety limit "
            f"(Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels; {e}); downscale it before training"
        ) from e
    except UnidentifiedImageError as e:
        raise ImageError(
            path,
            "not an image Pillow can read (damaged, or the extension does not match the content); "
            "re-save it as PNG or JPEG, or delete it"
        ) from e
    except Exception as e:  # any decoder failure on a user's file: truncated data, bad chunks, broken header
        raise ImageError(
            path,
            f"the image is damaged or truncated ({type(e).__name__}: {e}); "
            "re-export it from the original, or delete it"
        ) from e
    if _orientation(im) in _SWAPS_SIDES:
        width, height = height, width
    return im, (width, height)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels become white."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit grayscale: Pillow's own convert clips at 255 (nearly all white); scale 0..65535 -> 0..255 instead.
        arr = np.asarray(im, dtype=np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return im


def open_training_image(path: str | os.PathLike) -> Image.Image:
    """Return the image at ``path`` as training sees it: RGB, EXIF-oriented, alpha composited on white.

    The size is the one :func:`probe_image` reports. Raises ImageError, a TrainerError (unreadable, zero-byte,
    not an image, truncated, past the decompression-bomb limit), each message naming the file and what to do.
    """
    path = Path(path)
    im, _ = _decode(path, draft=False)
    try:
        if _orientation(im) != 1:
            im = ImageOps.exif_transpose(im)
        return _to_rgb(im)
    except Exception as e:
        raise ImageError(path, f"the image cannot be converted to RGB ({type(e).__name__}: {e}); "
                               "re-save it as an 8-bit RGB PNG or JPEG") from e


def probe_image(path: str | os.PathLike) -> tuple[int, int] | Problem:
    """Decode the whole file and return its oriented ``(width, height)`` in pixels, or a Problem naming the file."""
    try:
        _, size = _decode(Path(path), draft=True)
    except ImageError as e:
        return Problem(str(path), e.detail)
    return size
