"""The files a run leaves under its final name (its config next to them), and the check that a new run does not
replace them."""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig, save_config
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


def config_path(cfg: TrainConfig) -> Path:
    """``NAME.config.json`` in the output folder: the settings a run was started with, next to its files."""
    return Path(cfg.output.output_dir) / f"{cfg.output.name}.config.json"


def save_run_config(cfg: TrainConfig) -> Path:
    """Create the output folder and write :func:`config_path` (before training starts); returns the path."""
    path = config_path(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_config(cfg, path)
    except OSError as e:
        from .storage import advice, reason

        raise TrainerError(f"Cannot write {path}: {reason(e)}. {advice(e)}.") from None
