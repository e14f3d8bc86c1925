"""Small image/caption file makers for the tests/test_data_*.py files (not a conftest: plain functions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A [height, width, 3] uint8 image with structure (gradients + noise), so it compresses to non-trivial files."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    base = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 128.0)], axis=2)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def save_image(path: Path, size: tuple[int, int] = (96, 80), *, seed: int = 0, **save_kwargs) -> Path:
    """Write an RGB image of ``size`` = (width, height); the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gradient(size[0], size[1], seed)).save(path, **save_kwargs)
    return path


def write_caption(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def truncate(path: Path) -> Path:
    """Cut the file to half its length (a download or copy that stopped midway)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
