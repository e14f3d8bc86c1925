"""The Trainer tab's settings, one UI field per config field, and the mapping UI values ↔ config dict.

The fields are generated from the config's declarations (:mod:`lib_train.settings`): every setting with a tab group
has exactly one :class:`FieldSpec` (label, info = its help with the LoRA defaults, and each method's own info where a
method words it differently; choices; the number input's range from the setting's declared range); the others are
:data:`NOT_IN_UI` with the reason. ``method`` is the tab's method radio (:data:`METHOD_CHOICES`), ``version`` is
written by the config itself. Where a field's component sits is :data:`GROUPS` (titles here; each setting names its
group), in the rows of :func:`rows_of`. This module does not import gradio, so it is usable (and tested) on its own.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
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
# The method radio's choices: (shown label, value); the value is what the config and the API call the method.
METHOD_CHOICES: list[tuple[str, str]] = [(m.label, name) for name, m in methods.METHODS.items()]

# Steps of number inputs whose setting must be a multiple of something (what validate() asks of them); other int
# settings step by 1, float settings by a tenth of their default's order of magnitude.
MULTIPLE_OF: dict[str, int] = {"data.resolution": 64, "data.min_bucket_side": 8, "data.max_bucket_side": 8,
                               "data.bucket_step": 8, "sample.width": 8, "sample.height": 8}
RADIO_MAX_CHOICES = 4  # a closed set of at most this many choices is a radio group, a larger one a dropdown
SLIDER_MAX_STEPS = 2048  # a closed range of at most this many steps is a slider (the WebUI's Width is 64-2048 by 8)


@dataclass(frozen=True)
class FieldSpec:
    key: str  # "section.field"
    kind: type  # bool | int | float | str: the field's default's type
    default: Any  # the "lora" method's default
    label: str
    info: str  # the help as the "lora" method words it
    choices: tuple | None = None
    minimum: float | None = None  # numbers: the setting's declared range (None = open on that side)
    maximum: float | None = None
    step: float | None = None  # numbers: the input's step
    method_info: dict[str, str] = field(default_factory=dict)  # method → its info, where it differs from ``info``
    methods: tuple[str, ...] | None = None  # the methods it applies to (None = every method); hidden for the others

    @property
    def slider(self) -> bool:
        """A number with a closed range of a few steps shows as a slider (as the WebUI's sizes and steps do)."""
        return (self.kind in (int, float) and self.choices is None and self.minimum is not None
                and self.maximum is not None and (self.maximum - self.minimum) / self.step <= SLIDER_MAX_STEPS)

    @property
    def radio(self) -> bool:
        """A closed set of a few choices shows as radio buttons (as the WebUI's own few-choice settings do)."""
        return self.choices is not None and len(self.choices) <= RADIO_MAX_CHOICES and self.key not in CUSTOM_CHOICE

    @property
    def wide(self) -> bool:
        """A free text (a path, a prompt, arguments) that needs a wide box."""
        return self.kind is str and self.choices is None and self.key not in _SHORT_TEXT

    def info_for(self, method: str) -> str:
        return self.method_info.get(method, self.info)

    def shown_for(self, method: str) -> bool:
        return self.methods is None or method in self.methods


_SHORT_TEXT = {"data.caption_extension", "sample.sampler"}  # one word


def _step(key: str, kind: type, default: Any, low: float | None, high: float | None) -> float | None:
    if kind not in (int, float):
        return None
    if key in MULTIPLE_OF:
        return MULTIPLE_OF[key]
    if kind is int:
        return 1
    if low is not None and high is not None:  # a closed range: a hundredth of it (0-1 by 0.01, 1-30 by 0.1)
        return 10.0 ** math.floor(math.log10((high - low) / 100))
    return 10.0 ** (math.floor(math.log10(abs(default))) - 1) if default else 0.01


def _build_specs() -> dict[str, FieldSpec]:
    specs = {}
    for d in _DECLARED:
        if not d.spec.group:
            continue
        infos = {m: d.spec.help_for(m).replace("{default}", format_default(method_default(m, d.key)))
                 for m in methods.METHODS if d.spec.applies_to(m)}
        default = method_default(methods.DEFAULT_METHOD, d.key)
        info = d.spec.help.replace("{default}", format_default(default))
        label = d.spec.label or d.name.replace("_", " ").capitalize()
        low, high = d.spec.range or (None, None)
        low = None if low is None or math.isinf(low) else low
        high = None if high is None or math.isinf(high) else high
        specs[d.key] = FieldSpec(d.key, d.type, default, label, info, choices_of(d.spec), low, high,
                                 _step(d.key, d.type, default, low, high),
                                 {m: text for m, text in infos.items() if text != info}, d.spec.methods)
    return specs


SPECS: dict[str, FieldSpec] = _build_specs()
KEYS: list[str] = list(SPECS)  # the order of the field components in every handler's inputs/outputs


def rows_of(keys: list[str]) -> list[list[str]]:
    """A group's fields in rows, as the WebUI lays out its forms: wide text boxes two to a row; small inputs
    (numbers, dropdowns, radios; a slider counts twice, it needs the room) in rows of at most four, as even as the
    order allows and never one alone at full width (a single one joins a row of wide boxes); the checkboxes together
    in rows of their own at the end. The wide rows come first when the group's first field is a wide one."""
    specs = [SPECS[k] for k in keys]
    wide = [s.key for s in specs if s.wide]
    small = [s.key for s in specs if not s.wide and s.kind is not bool]
    checks = [s.key for s in specs if s.kind is bool]
    wide_rows = [wide[i:i + 2] for i in range(0, len(wide), 2)]
    small_rows = _spread(small, {k: 2 if SPECS[k].slider else 1 for k in small})
    if len(small) == 1 and wide_rows:
        wide_rows[-1] += small
        small_rows = []
    first_wide = bool(wide) and specs[0].wide
    rows = wide_rows + small_rows if first_wide else small_rows + wide_rows
    return rows + _spread(checks, {k: 1 for k in checks})


def _spread(keys: list[str], weight: dict[str, int], most: int = 4) -> list[list[str]]:
    """``keys`` in order, cut into the fewest rows of at most ``most`` weight each, none of one field where that can
    be helped, the rows' weights as even as can be."""
    if not keys:
        return []
    best: tuple | None = None
    for n in range(math.ceil(sum(weight.values()) / most), len(keys) + 1):
        for cuts in itertools.combinations(range(1, len(keys)), n - 1):
            rows = [keys[a:b] for a, b in zip((0, *cuts), (*cuts, len(keys)))]
            weights = [sum(weight[k] for k in row) for row in rows]
            if max(weights) > most:
                continue
            score = (sum(len(row) == 1 for row in rows), n, max(weights) - min(weights))
            if best is None or score < best[0]:
                best = (score, rows)
        if best is not None and best[0][0] == 0:
            break
    return best[1]


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

