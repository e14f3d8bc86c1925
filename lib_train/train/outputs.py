"""The files a finished run leaves under its final name, and the check that a new run does not replace them."""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from ..errors import TrainerError
from ..methods import DEFAULT_METHOD, METHODS


def final_paths(cfg: TrainConfig) -> list[Path]:
    """``NAME.safetensors`` in the output folder, and ``NAME.pt`` for an embedding with ``embedding.write_pt``."""
    method = METHODS.get(cfg.method) if isinstance(cfg.method, str) else None
    extensions = (method or METHODS[DEFAULT_METHOD]).written(cfg)
    return [Path(cfg.output.output_dir) / f"{cfg.output.name}{ext}" for ext in extensions]


def existing_final(cfg: TrainConfig) -> Path | None:
    """The first final file of ``cfg`` that exists already, when ``output.overwrite`` is off; else None."""
    if cfg.output.overwrite:
        return None
    return next((p for p in final_paths(cfg) if p.exists()), None)


def check_final_free(cfg: TrainConfig) -> None:
    """Raise :class:`TrainerError` when a new run of ``cfg`` would replace a final file (see :func:`existing_final`)."""
    path = existing_final(cfg)
    if path is not None:
        raise TrainerError(f"{path} already exists. Choose another output.name, delete the file, or set "
                           "output.overwrite (--overwrite) to replace it.")
