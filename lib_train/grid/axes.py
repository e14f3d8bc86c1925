"""The grid's values: weight specs (``"0.2-1.0 (+0.2)"``, ``"0.2-1.0 [5]"``, ``"0.4, 0.7, 1"``), seed specs, drawn
seeds, and the optional third axis (prompts or seeds). Every problem raises :class:`~lib_train.errors.TrainerError`
naming the field."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import TrainerError

THIRD_AXES = ("Nothing", "Prompts", "Seeds")
MAX_VALUES = 64  # per axis
SEED_LIMIT = 4294967294  # the WebUI draws seeds from range(4294967294)
LABEL_CHARS = 80  # third-axis prompt labels are cut to this many characters

NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_RANGE_STEP = re.compile(rf"^({NUMBER})\s*-\s*({NUMBER})\s*\(\s*({NUMBER})\s*\)$")
_RANGE_COUNT = re.compile(rf"^({NUMBER})\s*-\s*({NUMBER})\s*\[\s*(\d+)\s*\]$")
_RANGE_BARE = re.compile(rf"^({NUMBER})\s*-\s*({NUMBER})$")
_SEED_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def format_weight(w: float) -> str:
    """``0.6000000001`` → ``0.6``, ``1.0`` → ``1``: at most 4 decimals, no trailing zeros."""
    text = f"{round(float(w), 4):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _number(text: str, fld: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TrainerError(f"{fld}: '{item}' is not a number") from None
    if not math.isfinite(value):
        raise TrainerError(f"{fld}: '{item}' is not a finite number")
    return value


def _expand_range(item: str, fld: str) -> list[float]:
    m = _RANGE_STEP.match(item)
    if m:
        start, end, step = (_number(g, fld, item) for g in m.groups())
        if step == 0:
            raise TrainerError(f"{fld}: '{item}' has a step of 0; use e.g. 0.2-1.0 (+0.2)")
        if (end - start) * step < 0:
            raise TrainerError(f"{fld}: '{item}' steps away from its end; use "
                               f"({'+' if end > start else '-'}{format_weight(abs(step))})")
        n = int(math.floor((end - start) / step + 1e-9)) + 1
        if n > MAX_VALUES:
            raise TrainerError(f"{fld}: '{item}' gives {n} values; at most {MAX_VALUES} per axis")
        values = [start + i * step for i in range(n)]
        return [round(v, 6) for v in values]
    m = _RANGE_COUNT.match(item)
    if m:
        start, end = _number(m.group(1), fld, item), _number(m.group(2), fld, item)
        count = int(m.group(3))
        if count < 1 or count > MAX_VALUES:
            raise TrainerError(f"{fld}: '{item}' asks for {count} values; give 1 to {MAX_VALUES}")
        if count == 1:
            return [round(start, 6)]
        return [round(start + (end - start) * i / (count - 1), 6) for i in range(count)]
    if _RANGE_BARE.match(item):
        raise TrainerError(f"{fld}: '{item}' is a range without a step; write e.g. '{item} (+0.2)' or "
                           f"'{item} [5]' (5 evenly spaced values)")
    return [_number(item, fld, item)]


def parse_weights(spec: str, fld: str = "weights") -> list[float]:
    """``"0.2-1.0 (+0.2)"`` (start-end with a step), ``"0.2-1.0 [5]"`` (5 evenly spaced values), ``"0.4, 0.7, 1"``,
    or a mix separated by commas. Order is kept, repeats are dropped; negative weights are allowed."""
    items = [s.strip() for s in re.split(r"[,\n;]", spec or "")]
    values: list[float] = []
    for item in items:
        if item:
            values += _expand_range(item, fld)
    if not values:
        raise TrainerError(f"{fld}: give at least one weight, e.g. '0.2-1.0 (+0.2)' or '0.4, 0.7, 1'")
    unique = list(dict.fromkeys(round(v, 6) for v in values))
    if len(unique) > MAX_VALUES:
        raise TrainerError(f"{fld}: {len(unique)} values; at most {MAX_VALUES} per axis")
    return unique


def parse_seeds(spec: str, fld: str = "seeds") -> list[int]:
    """``"1, 2, 3"``, ``"100-103"`` (inclusive) or ``-1`` (a random seed, drawn once: :func:`fix_seeds`)."""
    seeds: list[int] = []
    for item in (s.strip() for s in re.split(r"[,\n;]", spec or "")):
        if not item:
            continue
        m = _SEED_RANGE.match(item)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a or b - a + 1 > MAX_VALUES:
                raise TrainerError(f"{fld}: '{item}' must go upwards and hold at most {MAX_VALUES} seeds")
            seeds += list(range(a, b + 1))
            continue
        try:
            seed = int(item)
        except ValueError:
            raise TrainerError(f"{fld}: '{item}' is not a whole number (use -1 for a random seed)") from None
        if seed < -1 or seed >= 2 ** 32:
            raise TrainerError(f"{fld}: {seed} is out of range; use 0 to {2 ** 32 - 1}, or -1 for a random seed")
        seeds.append(seed)
    if not seeds:
        raise TrainerError(f"{fld}: give at least one seed, e.g. '1, 2, 3' or '100-103'")
    if len(seeds) > MAX_VALUES:
        raise TrainerError(f"{fld}: {len(seeds)} seeds; at most {MAX_VALUES} per axis")
    return seeds


def fix_seed(seed: int | None, draw: Callable[[], int]) -> int:
    """``-1`` (or None) → one drawn seed; anything else is kept."""
    return int(draw()) if seed is None or int(seed) == -1 else int(seed)


def fix_seeds(seeds: Sequence[int], draw: Callable[[], int]) -> list[int]:
    """Each ``-1`` is drawn once (so every cell of that row shares it)."""
    return [fix_seed(s, draw) for s in seeds]


@dataclass(frozen=True)
class ThirdValue:
    """One value of the third axis: a prompt that replaces the main one, or a seed (None: not this kind)."""

    prompt: str | None = None
    seed: int | None = None

    @property
    def label(self) -> str:
        if self.seed is not None:
            return f"seed {self.seed}"
        if self.prompt is not None:
            text = " ".join(self.prompt.split())
            return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"
        return ""


def parse_third_axis(kind: str, text: str, draw: Callable[[], int]) -> list[ThirdValue]:
    """``Nothing`` → one empty value; ``Prompts`` → one value per non-empty line; ``Seeds`` → :func:`parse_seeds`
    with ``-1`` drawn once."""
    kind = (kind or "Nothing").strip()
    if kind == "Nothing":
        return [ThirdValue()]
    if kind == "Prompts":
        lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
        if not lines:
            raise TrainerError("third axis: give one prompt per line")
        if len(lines) > MAX_VALUES:
            raise TrainerError(f"third axis: {len(lines)} prompts; at most {MAX_VALUES}")
        return [ThirdValue(prompt=ln) for ln in lines]
    if kind == "Seeds":
        return [ThirdValue(seed=s) for s in fix_seeds(parse_seeds(text, "third axis"), draw)]
    raise TrainerError(f"third axis: '{kind}' is not one of {', '.join(THIRD_AXES)}")
