"""Keeping a grid's choice: the chosen weight as ``"preferred weight"`` in the LoRA's ``.json`` sidecar (the Lora
card then inserts ``<lora:NAME:w>``), and promoting the chosen file to the run's final ``NAME.safetensors``. The
file a promotion replaces is never lost (see :func:`promote_to_final`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .. import methods
from ..atomic import atomic_write
from ..errors import TrainerError
from ..safetensors_io import data_offset, read_metadata, read_safetensors_header, sha256_from
from ..models.families import SIDECAR_SD_VERSIONS, family_name_from_metadata
from ..train.sidecar import write_lora_sidecar
from .axes import format_weight
from .runs import Run, _int_or_none


@dataclass
class KeepResult:
    messages: list[str] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)
    final: Path | None = None  # the promoted final file
    kept_aside: Path | None = None  # where the replaced final went


def _family_of(sidecar: dict, meta: dict[str, str]) -> str:
    """The sidecar's ``sd version`` as a family key (kept as it is), else the family the metadata implies; both
    through the family records (every record, SDXL included, whether or not this version trains it)."""
    reverse = {v: k for k, v in SIDECAR_SD_VERSIONS.items()}
    if "sd version" in sidecar:
        return reverse.get(str(sidecar["sd version"]), "unknown")
    return family_name_from_metadata(meta)


def write_preferred_weight(model_file: str | os.PathLike, weight: float) -> Path:
    """Set ``"preferred weight"`` in the model's ``<stem>.json`` (the Lora card's metadata), keeping every other
    key (the user's edits, activation text, ``sd version``)."""
    model_file = Path(model_file)
    if not math.isfinite(weight):
        raise TrainerError(f"weight: {weight} is not a finite number")
    if weight == 0:
        raise TrainerError("weight: 0 cannot be a preferred weight (the Lora card reads 0 as 'use the default "
                           "multiplier'); choose a weight other than 0")
    sidecar_path = model_file.with_suffix(".json")
    try:
        existing = json.loads(sidecar_path.read_text(encoding="utf-8")) if sidecar_path.exists() else {}
    except (OSError, ValueError):
        existing = {}
    existing = existing if isinstance(existing, dict) else {}
    family = _family_of(existing, read_metadata(model_file))
    return write_lora_sidecar(model_file, family=family, preferred_weight=round(float(weight), 4))


def _data_digest(path: Path) -> str:
    """sha256 of a safetensors file's data section (other files: of the whole file)."""
    return sha256_from(path, data_offset(path) if path.suffix.lower() == ".safetensors" else 0)


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same data section: by their ``sshs_model_hash`` (the sha256 of
    that section, which this trainer and kohya's write) when both have one, else by hashing both."""
    size_a = a.stat().st_size - read_safetensors_header(a)[1]
    size_b = b.stat().st_size - read_safetensors_header(b)[1]
    if size_a != size_b:
        return False
    hash_a, hash_b = read_metadata(a).get("sshs_model_hash"), read_metadata(b).get("sshs_model_hash")
    if hash_a and hash_b:
        return hash_a == hash_b
    return _data_digest(a) == _data_digest(b)


_NAME_KEYS = ("ss_output_name", "modelspec.title", "modelspec.trigger_phrase")


def copy_renamed(src: Path, dst: Path, stem: str) -> Path:
    """Copy a model file to ``dst`` atomically. In a safetensors file the name fields that held the old stem
    (``ss_output_name``, the WebUI's alias; ``modelspec.title``/``trigger_phrase``) are set to ``stem``; the
    tensors are copied byte for byte (so ``sshs_model_hash`` stays right)."""
    if src.suffix.lower() != ".safetensors":
        def copy_plain(tmp: str) -> None:
            shutil.copyfile(src, tmp)

        return atomic_write(dst, copy_plain)
    header, offset = read_safetensors_header(src)
    meta = header.get("__metadata__")
    if isinstance(meta, dict):
        header = dict(header)
        header["__metadata__"] = {k: (stem if k in _NAME_KEYS else v) for k, v in meta.items()}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors writers do

    def write(tmp: str) -> None:
        with open(src, "rb") as f_in, open(tmp, "wb") as f_out:
            f_out.write(struct.pack("<Q", len(raw)))
            f_out.write(raw)
            f_in.seek(offset)
            shutil.copyfileobj(f_in, f_out, 1 << 20)

    return atomic_write(dst, write)


def _aside_stem(run: Run, final: Path) -> str:
    """Where the current final goes when another file replaces it: its own epoch name (LoRA ``NAME-000010`` from
    its ``ss_epoch``) when that name is free, else ``NAME-previous`` (``-2``, ``-3``… if taken)."""
    method = methods.get(run.kind)
    epoch = _int_or_none(read_metadata(final).get("ss_epoch")) if method.numbered_by == "epoch" else None
    if epoch is not None and epoch > 0:
        stem = f"{run.name}-{epoch:06d}"
        if not any((run.folder / f"{stem}{ext}").exists() for ext in method.extensions):
            return stem
    stem, n = f"{run.name}-previous", 1
    while any((run.folder / f"{stem}{ext}").exists() for ext in method.extensions):
        n += 1
        stem = f"{run.name}-previous-{n}"
    return stem


def promote_to_final(run: Run, stem: str) -> KeepResult:
    """Make the run's file ``stem`` its final ``NAME.safetensors`` (an embedding's ``NAME.pt`` follows).

    The current final is never lost: when its tensors already exist in another file of the run (a former
    promotion) it is simply replaced; otherwise it is first kept under its epoch name (``NAME-000010``, LoRA) or
    ``NAME-previous`` (see :func:`_aside_stem`), with its name fields set to that stem. The copy gets the name
    fields of ``NAME`` so the Lora card's alias is the run's name.
    """
    chosen = run.file(stem)
    result = KeepResult()
    final = run.final_path
    if chosen.path == final:
        result.messages.append(f"{final.name} already is the final file; nothing to copy.")
        result.final = final
        return result
    if chosen.path.suffix.lower() != ".safetensors":
        raise TrainerError(f"files: {chosen.path.name} is not a .safetensors file; only .safetensors files can "
                           "become the final file")
    if final.exists():
        duplicate = next((f for f in run.files if f.path != final and f.path.suffix.lower() == ".safetensors"
                          and _same_tensors(f.path, final)), None)
        if duplicate is None:
            aside = _aside_stem(run, final)
            result.kept_aside = copy_renamed(final, run.folder / f"{aside}.safetensors", aside)
            old_pt = final.with_suffix(".pt")
            if old_pt.exists():
                copy_renamed(old_pt, run.folder / f"{aside}.pt", aside)
            result.messages.append(f"The previous {final.name} was kept as {result.kept_aside.name}.")
        else:
            result.messages.append(f"The previous {final.name} equals {duplicate.path.name}; it was replaced.")
    result.final = copy_renamed(chosen.path, final, run.name)
    new_pt = next((p for p in chosen.siblings if p.suffix.lower() == ".pt"), None)
    old_pt = final.with_suffix(".pt")
    if new_pt is not None:
        copy_renamed(new_pt, old_pt, run.name)
    elif old_pt.exists():
        old_pt.unlink()  # kept aside above; a stale NAME.pt would shadow the new NAME.safetensors
    result.messages.append(f"{chosen.path.name} ({chosen.label}) is now {final.name}.")
    return result


def keep_choice(run: Run, stem: str, weight: float | None, *, promote: bool = False) -> KeepResult:
    """Keep a grid's choice: the run's file ``stem`` at ``weight``.

    ``promote`` copies the file to the run's final ``NAME.safetensors`` (:func:`promote_to_final`). For a LoRA run,
    ``weight`` is written as ``"preferred weight"`` into the chosen file's ``<stem>.json`` and, when promoted, into
    ``NAME.json`` — the Lora card then inserts ``<lora:NAME:weight>``. Embedding cards have no weight: for an
    embedding run only the promotion happens and the message says how to weight it in a prompt.
    """
    chosen = run.file(stem)
    result = promote_to_final(run, chosen.stem) if promote else KeepResult()
    if weight is None:
        return result
    if methods.get(run.kind).preferred_weight:
        targets = [chosen.path] + ([result.final] if result.final and result.final != chosen.path else [])
        for target in targets:
            result.sidecars.append(write_preferred_weight(target, weight))
        names = " and ".join(p.name for p in result.sidecars)
        result.messages.append(f"Preferred weight {format_weight(weight)} written to {names}.")
    else:
        name = run.name if promote else chosen.stem
        result.messages.append(f"Embeddings have no preferred weight; write ({name}:{format_weight(weight)}) in "
                               "the prompt.")
    return result
