"""Resume state: everything needed to continue a run exactly where it stopped.

A state folder ``<output>/<name>-state/`` holds:

- ``state.json``: position (optimizer step, epoch, batch within the epoch), the run's config, facts (session id,
  start time, optimizer used), the dataset fingerprint and the files saved so far;
- ``network.safetensors``: the LoRA weights in fp32 (kohya keys);
- ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``: ``torch.save`` of plain state dicts, read back with
  ``torch.load(weights_only=True)`` (tensors, numbers, lists and dicts only — never arbitrary pickles).

All randomness of a step is derived from (seed, step), and the epoch plans from (seed, epoch), so no RNG state needs
saving: the resumed run draws exactly what the uninterrupted run would have drawn. The folder is replaced
atomically: written as ``<name>-state.tmp-*``, then swapped in.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainerError

STATE_VERSION = 1


@dataclass
class RunState:
    step: int  # optimizer steps done
    epoch: int  # 0-based epoch the next batch belongs to
    batch: int  # index of the next batch within that epoch's plan
    config: dict[str, Any]
    session_id: int
    started_at: float
    optimizer: str
    dataset_fingerprint: str
    saved: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self.__dict__}


def state_dir_for(output_dir: str | os.PathLike, name: str) -> Path:
    return Path(output_dir) / f"{name}-state"


def save_state(directory: str | os.PathLike, state: RunState, network_tensors: dict[str, torch.Tensor],
               optimizer: dict, scheduler: dict, scaler: dict | None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(network_tensors, str(tmp / "network.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(scheduler, tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler, tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps(state.to_json(), indent=2), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


@dataclass
class LoadedState:
    state: RunState
    network: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None


def load_state(directory: str | os.PathLike) -> LoadedState:
    directory = Path(directory)
    state_file = directory / "state.json"
    if not state_file.is_file():
        # Accept the output folder too: find the single *-state folder in it.
        candidates = sorted(directory.glob("*-state")) if directory.is_dir() else []
        if len(candidates) == 1:
            return load_state(candidates[0])
        raise TrainerError(f"{directory} is not a resume-state folder (no state.json). Point --resume at the "
                           "'<name>-state' folder the interrupted run wrote.")
    try:
        data = json.loads(state_file.read_text(encoding="utf-8"))
        version = data.pop("version", 0)
        if version > STATE_VERSION:
            raise TrainerError(f"{directory} was written by a newer sd-webui-trainer; update to resume it.")
        state = RunState(**data)
        from safetensors.torch import load_file

        network = load_file(str(directory / "network.safetensors"))
        optimizer = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        scheduler = torch.load(directory / "scheduler.pt", map_location="cpu", weights_only=True)
        scaler_file = directory / "scaler.pt"
        scaler = torch.load(scaler_file, map_location="cpu", weights_only=True) if scaler_file.exists() else None
    except TrainerError:
        raise
    except Exception as e:  # noqa: BLE001 - any damage means the state cannot be used
        raise TrainerError(f"The resume state in {directory} is damaged ({type(e).__name__}: {e}). Resume from an "
                           "earlier copy or start again from the last saved LoRA with network.init_from.") from None
    return LoadedState(state, network, optimizer, scheduler, scaler)
