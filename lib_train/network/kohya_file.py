"""Read and write kohya-format LoRA ``.safetensors`` files (FORMATS.md §0, §A.1, §B.3).

A file holds flat keys ``<stem>.lora_down.weight`` / ``<stem>.lora_up.weight`` / ``<stem>.alpha`` with stems starting
``lora_unet_``, ``lora_te_``, ``lora_te1_`` or ``lora_te2_`` (other prefixes make diffusers skip its kohya path,
§A.4.3), and string-only metadata including the two kohya hashes ``sshs_model_hash`` and ``sshs_legacy_hash``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..atomic import atomic_write
from ..errors import TrainerError

KEY_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KEY_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_LEGACY_START, _LEGACY_END = 0x100000, 0x110000


def _bad_keys(keys) -> list[str]:
    return [k for k in keys if not (k.startswith(KEY_PREFIXES) and k.endswith(KEY_SUFFIXES))]


def _first(items: list[str], limit: int = 5) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(repr(k) for k in items[:limit]) + more


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) exactly as kohya computes them (FORMATS §B.3).

    B = safetensors bytes of ``tensors`` with only the ``ss_*`` metadata; n = little-endian u64 of B[0:8].
    model hash = sha256(B[8+n:]) (the data section only, so it equals the WebUI's "addnet" hash of the final file);
    legacy hash = first 8 hex of sha256(B[0x100000:0x110000]).
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(tensors, metadata=ss_only)
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(data[_LEGACY_START:_LEGACY_END]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_lora_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` with ``metadata`` plus fresh ``sshs_model_hash``/``sshs_legacy_hash`` to ``path`` atomically.

    ``tensors`` must be CPU, contiguous and not share storage (as :meth:`LoRANetwork.kohya_state_dict` returns).
    Raises ``TypeError`` if a metadata key or value is not a ``str`` (every consumer expects strings, §B.1) and
    ``ValueError`` for a key outside the kohya LoRA key scheme. Returns the written path.
    """
    not_str = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if not_str:
        raise TypeError(f"LoRA metadata values must be str; not str: {_first([str(k) for k in not_str])}")
    bad = _bad_keys(tensors)
    if bad or not tensors:
        raise ValueError(f"not kohya LoRA keys (need {'/'.join(KEY_PREFIXES)} + "
                         f"{'/'.join(KEY_SUFFIXES)}): {_first(bad) if bad else 'no tensors'}")
    model_hash, legacy_hash = kohya_hashes(tensors, metadata)
    full = dict(metadata, sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=full))


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata) of a kohya LoRA file; :class:`TrainerError` naming the file if it is missing, not a
    safetensors file, or holds keys other than plain LoRA keys (e.g. a checkpoint, an embedding, LoHa/LoKr)."""
    path = Path(path)
    if not path.is_file():
        raise TrainerError(f"LoRA file {path} does not exist; pick an existing .safetensors LoRA")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise TrainerError(f"{path} is not a readable .safetensors file ({e}); pick a kohya LoRA .safetensors") from e
    bad = _bad_keys(tensors)
    if bad or not tensors:
        found = f"it contains {_first(bad)}" if bad else "it contains no tensors"
        raise TrainerError(f"{path} is not a kohya LoRA/LoCon file: {found}; pick a LoRA trained with "
                           "kohya sd-scripts or this extension")
    return tensors, metadata

