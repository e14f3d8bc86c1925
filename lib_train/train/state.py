"""Resume state: everything needed to continue a run exactly where it stopped.

A state folder ``<output>/.<name>-state/`` holds (hidden, so the WebUI's Lora list never shows the weights inside
as a LoRA card):

- ``state.json``: position (optimizer step, epoch, batch within the epoch), the run's config, facts (session id,
  start time, optimizer used), the dataset fingerprint, the files saved so far and the learning-rate history
  (:class:`~lib_train.train.lr_history.LRHistory`, so a resumed run continues its chart);
- ``network.safetensors``: the LoRA weights in fp32 (kohya keys);
- ``optimizer``, ``scheduler``, ``scaler``: each state dict as a ``.json`` structure whose tensors live in a
  ``.safetensors`` file next to it (:func:`save_tree`). No pickle at all: nothing to trust when loading, and the
  WebUI's ``torch.load`` replacement (which rejects files written by recent torch) is never involved.

All randomness of a step is derived from (seed, step), and the epoch plans from (seed, epoch), so no RNG state needs
saving: the resumed run draws exactly what the uninterrupted run would have drawn. The folder is replaced
atomically: written as ``.<name>-state.tmp-*``, then swapped in (the previous one renamed to ``.<name>-state.old``
meanwhile, and removed after).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import UMASK, os_error_of
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
    lr_history: dict[str, Any] | None = None  # LRHistory.to_json() (None: a state written before it was kept)

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self.__dict__}


def state_dir_for(output_dir: str | os.PathLike, name: str) -> Path:
    return Path(output_dir) / f".{name}-state"


def _tensor_ref(tensors: dict[str, torch.Tensor], t: torch.Tensor) -> dict:
    key = str(len(tensors))
    tensors[key] = t.detach().to("cpu").contiguous().clone()
    return {"__tensor__": key}


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of a state dict; tensors moved to ``tensors``; tuples, int keys and non-finite floats kept."""
    if isinstance(obj, torch.Tensor):
        return _tensor_ref(tensors, obj)
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a resume state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
    return obj


def save_tree(folder: Path, name: str, obj: Any) -> None:
    """Write a state dict as ``name.json`` + ``name.safetensors`` (see the module docstring)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    (folder / f"{name}.json").write_text(json.dumps(_encode(obj, tensors)), encoding="utf-8")
    save_file(tensors, str(folder / f"{name}.safetensors"))


def load_tree(folder: Path, name: str) -> Any:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / f"{name}.safetensors"))
    return _decode(json.loads((folder / f"{name}.json").read_text(encoding="utf-8")), tensors)


def save_state(directory: str | os.PathLike, state: RunState, network_tensors: dict[str, torch.Tensor],
               optimizer: dict, scheduler: dict, scaler: dict | None) -> Path:
    """Write the state folder ``directory`` atomically (see the module docstring); a failed write raises
    :class:`OSError` (also where the writer reports it as its own error type) and leaves the previous state."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{directory.name}.tmp-", dir=directory.parent))
    try:
        try:
            save_file(network_tensors, str(tmp / "network.safetensors"))
            save_tree(tmp, "optimizer", optimizer)
            save_tree(tmp, "scheduler", scheduler)
            if scaler is not None:
                save_tree(tmp, "scaler", scaler)
            (tmp / "state.json").write_text(json.dumps(state.to_json(), indent=2), encoding="utf-8")
        except Exception as e:  # safetensors reports a full disk as its own error type
            found = os_error_of(e)
            if found is None or found is e:
                raise
            raise found from e
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.chmod(tmp, 0o777 & ~UMASK)
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
    notes: list[str] = field(default_factory=list)  # what the user should know (a state recovered from ``.old``)


def load_state(directory: str | os.PathLike) -> LoadedState:
    """The state in ``directory`` (a ``.NAME-state`` folder, or an output folder holding one). A state left only as
    ``.NAME-state.old`` (a kill between the two renames of a save) is renamed back, and a note says so."""
    from .storage import recover_old_state

    directory = Path(directory)
    notes: list[str] = []
    if not (directory / "state.json").is_file():
        olds = []
        if directory.name.endswith("-state"):
            olds = [directory]
        elif directory.is_dir() and not list(directory.glob(".*-state")):
            olds = [p.with_name(p.name[:-len(".old")]) for p in directory.glob(".*-state.old")]
        if len(olds) == 1:
            recovered = recover_old_state(olds[0])
            if recovered is not None:
                directory, note = recovered
                notes.append(note)
    state_file = directory / "state.json"
    if not state_file.is_file():
        # Accept the output folder too: find the single .*-state folder in it.
        candidates = sorted(directory.glob(".*-state")) if directory.is_dir() else []
        if len(candidates) == 1:
            return load_state(candidates[0])
        raise TrainerError(f"{directory} is not a resume-state folder (no state.json). Point --resume at the "
                           "'.<name>-state' folder the interrupted run wrote (or at its output folder).")
    try:
        data = json.loads(state_file.read_text(encoding="utf-8"))
        version = data.pop("version", 0)
        if version > STATE_VERSION:
            raise TrainerError(f"{directory} was written by a newer sd-webui-trainer; update to resume it.")
        state = RunState(**data)
        from safetensors.torch import load_file

        network = load_file(str(directory / "network.safetensors"))
        optimizer = load_tree(directory, "optimizer")
        scheduler = load_tree(directory, "scheduler")
        scaler = load_tree(directory, "scaler") if (directory / "scaler.json").exists() else None
    except TrainerError:
        raise
    except Exception as e:  # noqa: BLE001 - any damage means the state cannot be used
        raise TrainerError(f"The resume state in {directory} is damaged ({type(e).__name__}: {e}). Resume from an "
                           "earlier copy or start again from the last saved LoRA with network.init_from.") from None
    return LoadedState(state, network, optimizer, scheduler, scaler, notes)
