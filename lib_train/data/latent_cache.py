"""VAE latent cache and the pixel loader it caches.

A latent depends only on the image file's bytes, the bucket size, the crop offsets, the flip and the VAE, so the key
is sha256 over exactly those (plus :data:`PIXEL_PIPELINE_VERSION`, bumped whenever :func:`load_pixels` changes). The
resized size is not in the key: for a given source image and bucket it is fixed by ``buckets.py`` (cover resize).

Modes:

* ``memory``: a dict in this process.
* ``disk``: one ``<key>.safetensors`` per latent (tensor ``"latents"``) in ``cache_dir``, written atomically, reused
  by later runs and other processes; a file that cannot be read is ignored and rebuilt.
* ``off``: compute every time.

Latents are stored and returned on the CPU (the caller moves them to the device).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write
from ..errors import TrainerError
from .buckets import BucketPlan, Size
from .images import open_training_image

PIXEL_PIPELINE_VERSION = "1"
_TENSOR_NAME = "latents"
_HASH_CHUNK = 1 << 20


class CacheMode(str, Enum):
    MEMORY = "memory"
    DISK = "disk"
    OFF = "off"


def load_pixels(item_path: str | os.PathLike, plan: BucketPlan, flip: bool) -> torch.Tensor:
    """Image -> float32 tensor [3, bucket_h, bucket_w] in [-1, 1]: resize to ``plan.resized`` (LANCZOS when
    shrinking, BICUBIC when enlarging), crop ``plan.crop_box``, mirror left-right when ``flip``."""
    im = open_training_image(item_path)
    if im.size != plan.source:
        raise TrainerError(f"{item_path}: the image is now {im.size[0]}×{im.size[1]} pixels but was "
                           f"{plan.source[0]}×{plan.source[1]} when the dataset was scanned; scan the dataset again")
    if im.size != plan.resized:
        shrinking = plan.resized[0] * plan.resized[1] < im.size[0] * im.size[1]
        im = im.resize(plan.resized, Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC)
    im = im.crop(plan.crop_box)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class LatentCache:
    """Latents keyed by :meth:`key_for`; see the module docstring for the modes.

    ``vae_id`` names the VAE and anything else that changes its output (e.g. its dtype); a different id never
    reuses a latent.
    """

    def __init__(self, mode: CacheMode | str, cache_dir: str | os.PathLike | None, vae_id: str):
        try:
            self.mode = CacheMode(mode)
        except ValueError:
            raise TrainerError(f"latent cache mode '{mode}' is unknown; use one of "
                               f"{', '.join(m.value for m in CacheMode)}") from None
        if self.mode is CacheMode.DISK and not cache_dir:
            raise TrainerError("the latent cache is set to 'disk' but no cache folder is given; set a folder or "
                               "use 'memory'")
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.vae_id = vae_id
        self._memory: dict[str, torch.Tensor] = {}
        self._file_hashes: dict[tuple[str, int, int], str] = {}

    def file_hash(self, path: str | os.PathLike) -> str:
        """sha256 of the file's bytes, computed once per (path, mtime, size) for this cache's lifetime."""
        stat = os.stat(path)
        memo_key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
        digest = self._file_hashes.get(memo_key)
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                    h.update(chunk)
            digest = self._file_hashes[memo_key] = h.hexdigest()
        return digest

    def key_for(self, path: str | os.PathLike, size: Size, crop: tuple[int, int], flip: bool) -> str:
        """Hex key from the file content, bucket ``size`` (w, h), crop offsets (left, top), flip and the VAE id."""
        parts = [PIXEL_PIPELINE_VERSION, self.file_hash(path), list(size), list(crop), bool(flip), self.vae_id]
        return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()

    def _file(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{key}.safetensors"

    def _read(self, key: str) -> torch.Tensor | None:
        try:
            return load_file(str(self._file(key)))[_TENSOR_NAME]
        except Exception:  # missing, truncated, or not a safetensors file: rebuild it
            return None

    def _write(self, key: str, latents: torch.Tensor) -> None:
        atomic_write(self._file(key), lambda tmp: save_file({_TENSOR_NAME: latents}, tmp))

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached latents for ``key``, or ``compute()`` (stored on the CPU per the mode). Always a CPU tensor."""
        if self.mode is CacheMode.MEMORY and key in self._memory:
            return self._memory[key]
        if self.mode is CacheMode.DISK:
            cached = self._read(key)
            if cached is not None:
                return cached
        latents = compute().detach().to("cpu").contiguous()
        if self.mode is CacheMode.MEMORY:
            self._memory[key] = latents
        elif self.mode is CacheMode.DISK:
            self._write(key, latents)
        return latents
