"""Reading ``.safetensors`` files without loading tensors: the JSON header, its ``__metadata__``, and the sha256 of
the data section (the WebUI's "addnet" hash, equal to ``sshs_model_hash`` of a kohya LoRA, FORMATS.md §B.3).

A file is an 8-byte little-endian header length n, n bytes of JSON, then the data section. Every problem raises
:class:`~lib_train.errors.TrainerError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

from .errors import TrainerError

MAX_HEADER = 100_000_000  # bytes; a longer header means the file is not a safetensors file


def _header_length(f: BinaryIO, path: Path) -> int:
    """The header length n read from the open file ``f`` (at its start), checked against the file's size."""
    head = f.read(8)
    if len(head) < 8:
        raise TrainerError(f"{path} is not a safetensors file (it is shorter than a header)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or n > path.stat().st_size - 8:
        raise TrainerError(f"{path} is not a safetensors file (bad header length)")
    return n


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data section starts."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = _header_length(f, path)
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise TrainerError(f"{path} cannot be read: {e.strerror or e}") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise TrainerError(f"{path} is not a safetensors file (its header is not JSON)") from e
    if not isinstance(header, dict):
        raise TrainerError(f"{path} is not a safetensors file (its header is not a JSON object)")
    return header, 8 + n


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` ({} for other files or unreadable headers)."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    try:
        meta = read_safetensors_header(path)[0].get("__metadata__") or {}
    except TrainerError:
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def sha256_from(path: str | os.PathLike, offset: int = 0) -> str:
    """sha256 hex of a file's bytes from ``offset`` to its end, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_offset(path: str | os.PathLike) -> int:
    """Where a safetensors file's data section starts (8 + the header length); the header itself is not parsed."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return 8 + _header_length(f, path)
    except OSError as e:
        raise TrainerError(f"{path} cannot be read: {e.strerror or e}") from e


def data_section_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a safetensors file's data section (everything after the 8-byte length and the JSON header):
    the WebUI's "addnet" hash, equal to ``sshs_model_hash`` of a file written by
    :func:`lib_train.network.kohya_file.save_lora_file`."""
    return sha256_from(path, data_offset(path))
