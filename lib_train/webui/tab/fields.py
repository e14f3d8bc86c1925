"""The Trainer tab's settings, one UI field per config field, and the mapping UI values ↔ config dict.

The fields are generated from the config's declarations (:mod:`lib_train.settings`): every setting with a tab group
has exactly one :class:`FieldSpec` (label, info = its help with the LoRA defaults, choices); the others are
:data:`NOT_IN_UI` with the reason. ``method`` is the tab's method radio, ``version`` is written by the config itself.
Where a field's component sits is :data:`GROUPS` (titles here; each setting names its group). This module does not
import gradio, so it is usable (and tested) on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ... import methods
from ...config import SECTIONS, TrainConfig, default_config, method_default
from ...settings import Declared, choices_of, declared, format_default

_DECLARED: list[Declared] = list(declared(SECTIONS))

# Config fields the tab has no component for, and why.
NOT_IN_UI: dict[str, str] = {d.key: d.spec.not_in_ui for d in _DECLARED if not d.spec.group}
# Settings with choices whose other values are allowed too (a dropdown that takes a typed value: a template file).
CUSTOM_CHOICE = {d.key for d in _DECLARED if d.spec.custom}
# Text settings shown as a multi-line box.
MULTILINE = {d.key: d.spec.lines for d in _DECLARED if d.spec.lines > 1}

# The tab's groups (accordions, in order): id (the elem_id suffix) → title.
GROUP_TITLES: dict[str, str] = {
    "dataset": "Dataset", "images": "Images and captions", "network": "Network (LoRA)", "embedding": "Embedding",
    "optim": "Optimizer and schedule", "training": "Training", "output": "Output", "samples": "Sample images",
}


def _group_keys(group: str) -> list[str]:
    members = [(d.spec.ui_order, i, d.key) for i, d in enumerate(_DECLARED) if d.spec.group == group]
    return [key for _, _, key in sorted(members)]


# Where each component sits: (group id, title, keys).
GROUPS: list[tuple[str, str, list[str]]] = [(gid, title, _group_keys(gid)) for gid, title in GROUP_TITLES.items()]
# Groups shown only for one method: those holding a method's own section (the other method ignores it).
METHOD_GROUPS: dict[str, str] = {d.spec.group: owner.name for d in _DECLARED
                                 if (owner := methods.method_of(d.section)) is not None}


@dataclass(frozen=True)
class FieldSpec:
    key: str  # "section.field"
    kind: type  # bool | int | float | str: the field's default's type
    default: Any  # the "lora" method's default
    label: str
    info: str
    choices: tuple | None = None


def _build_specs() -> dict[str, FieldSpec]:
    specs = {}
    for d in _DECLARED:
        if not d.spec.group:
            continue
        default = method_default(methods.DEFAULT_METHOD, d.key)
        info = d.spec.help.replace("{default}", format_default(default))
        label = d.spec.label or d.name.replace("_", " ").capitalize()
        specs[d.key] = FieldSpec(d.key, d.type, default, label, info, choices_of(d.spec))
    return specs


SPECS: dict[str, FieldSpec] = _build_specs()
KEYS: list[str] = list(SPECS)  # the order of the field components in every handler's inputs/outputs


def values_to_dict(method: str, values: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
    """UI values (in :data:`KEYS` order) → a config dict for :func:`lib_train.config.from_dict`."""
    if len(values) != len(KEYS):
        raise ValueError(f"expected {len(KEYS)} values, got {len(values)}")
    data: dict[str, Any] = {"method": method}
    for key, value in zip(KEYS, values):
        section, name = key.split(".")
        if SPECS[key].kind is str and value is None:
            value = ""  # a cleared dropdown/textbox
        data.setdefault(section, {})[name] = value
    return data


def config_to_values(cfg: TrainConfig) -> list[Any]:
    """A config → UI values in :data:`KEYS` order."""
    return [getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in KEYS]


def method_default_changes(method: str, values: list[Any]) -> dict[str, Any]:
    """Fields to change when the method switches to ``method``: each method-dependent default
    (``Method.defaults``, :mod:`lib_train.methods`) still at some method's default value takes ``method``'s
    default."""
    keys = {k for m in methods.METHODS.values() for k in m.defaults}
    defaults = {m: config_to_values(default_config(m)) for m in methods.METHODS}
    out = {}
    for key in sorted(keys & set(KEYS)):
        i = KEYS.index(key)
        if any(values[i] == d[i] for d in defaults.values()):
            out[key] = defaults[method][i]
    return out

