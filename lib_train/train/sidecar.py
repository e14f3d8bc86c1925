"""The WebUI's per-model ``<stem>.json`` (user metadata of the Lora cards, FORMATS.md §B.5).

Keys the Lora tab reads: ``"activation text"`` (added to the prompt after the ``<lora:…>`` tag), ``"sd version"``
("SD1" | "SD2" | "SDXL" | "Unknown"), ``"preferred weight"`` (0 = use the default multiplier), ``"description"``,
``"negative text"``, ``"notes"``. Keys already in the file (a user's own edits) are kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write_text
from ..models.families import SIDECAR_SD_VERSIONS as SD_VERSIONS  # family name → "sd version"


def write_lora_sidecar(model_file: str | Path, *, family: str, activation_text: str = "",
                       preferred_weight: float | None = None, description: str | None = None) -> Path:
    path = Path(model_file).with_suffix(".json")
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data["sd version"] = SD_VERSIONS.get(family, "Unknown")
    if activation_text:
        data["activation text"] = activation_text
    if preferred_weight is not None:
        data["preferred weight"] = float(preferred_weight)
    if description is not None:
        data["description"] = description
    return atomic_write_text(path, json.dumps(data, indent=4, ensure_ascii=False))
