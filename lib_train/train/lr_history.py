"""The learning rate of a run, step by step: the scheduled rate of each parameter group (UNet, text encoder, an
embedding's vectors) and, for the adaptive optimizers (D-Adaptation, Prodigy), the effective step size ``d·lr``.

The rates are read from ``optimizer.param_groups`` right before each optimizer step, so a row holds the values that
step used. They are Python floats there (the schedule, a ``LambdaLR``, writes ``lr`` as a float; dadaptation 3.2 and
prodigyopt 1.1 keep ``d`` as a float: their sums are ``.item()``-ed inside ``step()``), so reading them costs no
host-device sync. Adafactor runs with ``relative_step=False`` here (Adafactor itself refuses an explicit lr with
``relative_step=True``), so its rate is the scheduled ``lr``; with ``scale_parameter=True`` it also scales each
update by the parameter's RMS, a per-tensor factor that no group value shows.

:class:`LRHistory` keeps at most ``limit`` rows ``[step, value, ...]`` (one value per :attr:`LRHistory.series`) at a
uniform stride: when it is full every other row is dropped and the stride doubles, and the newest step is always
kept (the final values). One history per run: the loop records it, progress events carry it (the job status and its
chart), the resume state keeps it (a resumed run continues its chart) and every saved file carries it in its
metadata (:func:`lib_train.train.metadata.lr_metadata`), so a finished run loaded in the tab shows its chart and,
for an adaptive optimizer, what it settled on (:meth:`LRHistory.summary`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

LR_POINTS = 1000  # rows a history keeps (the job status, the resume state)
FILE_POINTS = 250  # rows written into a saved file's metadata
GROUP_LABELS = {"unet": "UNet", "text_encoder": "Text encoder", "embedding": "Embedding vectors"}
EFFECTIVE = " d·lr"  # suffix of an adaptive group's effective-rate series ("UNet d·lr")
_IN_TEXT = {"UNet": "the UNet", "Text encoder": "the text encoder", "Embedding vectors": "the embedding's vectors"}


@dataclass(frozen=True)
class GroupRate:
    """One parameter group's rates at one step."""

    label: str  # "UNet", "Text encoder", "Embedding vectors" (:data:`GROUP_LABELS`) or "Group N"
    lr: float  # the scheduled learning rate of the step (nan: the group has none)
    base_lr: float  # the group's learning rate before the schedule (the setting)
    d: float | None  # an adaptive optimizer's step-size estimate d; None for the others

    @property
    def effective(self) -> float:
        """The step size the optimizer applies: ``d·lr`` for D-Adaptation/Prodigy, else ``lr``."""
        return self.lr * self.d if self.d is not None else self.lr

    def to_json(self) -> dict[str, Any]:
        return {"lr": _finite(self.lr), "base_lr": _finite(self.base_lr), "d": _finite(self.d),
                "d_lr": _finite(self.effective) if self.d is not None else None}


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _number(v: Any) -> float:
    """A group value as a float (a float already for every optimizer here; a tensor is read back)."""
    return math.nan if v is None else float(v)


def group_label(group: dict, index: int, count: int, single: str = "") -> str:
    """A parameter group's label: its ``name`` (LoRA: ``unet``/``text_encoder``), else ``single`` when it is the only
    group (an embedding run: ``"embedding"``), else ``Group N``."""
    name = group.get("name") or (single if count == 1 and single else "")
    return GROUP_LABELS.get(name, name) or f"Group {index + 1}"


def read_rates(optimizer: Any, single: str = "") -> list[GroupRate]:
    """The rates of every parameter group of ``optimizer`` now (call right before its step: the values it uses)."""
    groups = optimizer.param_groups
    return [GroupRate(label=group_label(g, i, len(groups), single), lr=_number(g.get("lr")),
                      base_lr=_number(g.get("initial_lr", g.get("lr"))),
                      d=_number(g["d"]) if "d" in g else None)
            for i, g in enumerate(groups)]


def series_of(rates: list[GroupRate]) -> list[str]:
    """Column names of the rows: each group's scheduled rate, and ``<group> d·lr`` for an adaptive one."""
    names = []
    for r in rates:
        names.append(r.label)
        if r.d is not None:
            names.append(r.label + EFFECTIVE)
    return names


def _row(step: int, rates: list[GroupRate]) -> list[float | None]:
    values: list[float | None] = [step]
    for r in rates:
        values.append(_finite(r.lr))
        if r.d is not None:
            values.append(_finite(r.effective))
    return values


class LRHistory:
    """The rates of a run, thinned to at most ``limit`` rows (see the module docstring)."""

    def __init__(self, optimizer: str = "", limit: int = LR_POINTS):
        self.optimizer = optimizer  # the optimizer used (for the summary)
        self.limit = limit
        self.series: list[str] = []
        self.rows: list[list[float | None]] = []  # rows at steps 1 + k·stride (the first row is always kept)
        self.stride = 1
        self.last: list[float | None] | None = None  # the newest row, kept whatever the stride
        self.final: list[GroupRate] = []  # the newest step's rates

    def add(self, step: int, rates: list[GroupRate]) -> None:
        """Record the rates optimizer step ``step`` (1-based) used; a change of groups starts the history afresh."""
        if not rates:
            return
        series = series_of(rates)
        if series != self.series:
            self.series, self.rows, self.stride = series, [], 1
        row = _row(step, rates)
        self.last, self.final = row, list(rates)
        if not self.rows or step % self.stride == 0:
            self.rows.append(row)
        if len(self.rows) > self.limit:
            self.stride *= 2
            first = self.rows[0][0]
            self.rows = [r for r in self.rows if r[0] == first or r[0] % self.stride == 0]

    @property
    def step(self) -> int:
        """The newest recorded step (0: none)."""
        return int(self.last[0]) if self.last else 0

    def points(self) -> list[list[float | None]]:
        """The rows to show: the thinned rows and the newest one."""
        if self.last is not None and (not self.rows or self.rows[-1][0] != self.last[0]):
            return [*self.rows, self.last]
        return list(self.rows)

    def thinned(self, limit: int) -> LRHistory:
        """A copy with at most ``limit`` rows (+ the newest), thinned the same way."""
        copy = LRHistory(self.optimizer, limit)
        copy.series, copy.stride, copy.last, copy.final = list(self.series), self.stride, self.last, list(self.final)
        copy.rows = list(self.rows)
        while len(copy.rows) > limit:
            copy.stride *= 2
            first = copy.rows[0][0]
            copy.rows = [r for r in copy.rows if r[0] == first or r[0] % copy.stride == 0]
        return copy

    @property
    def adaptive(self) -> bool:
        return any(r.d is not None for r in self.final)

    def summary(self, finished: bool = True) -> str:
        """One line on the newest rates. An adaptive optimizer: what it settled on, ``d`` × the group's base
        learning rate (its rate before the schedule), per group: a starting point for a non-adaptive optimizer's
        learning rate. Otherwise the scheduled rates of the last step. Empty before the first step."""
        if not self.final:
            return ""
        if self.adaptive:
            parts = _per_value([(r.d * r.base_lr, r.label) for r in self.final if r.d is not None])
            name = self.optimizer or "The adaptive optimizer"
            if finished:
                return f"{name} settled at {_and(parts)}: a starting point for AdamW"
            return f"{name} is at {_and(parts)} (d × learning rate) at step {self.step}"
        parts = _per_value([(r.lr, r.label) for r in self.final])
        at = f"the last step ({self.step})" if finished else f"step {self.step}"
        return f"Learning rate at {at}: {_and(parts)}"

    # ---- storage (the resume state, a file's metadata)
    def to_json(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "series": self.series, "stride": self.stride, "rows": self.rows,
                "last": self.last, "final": {r.label: r.to_json() for r in self.final}}

    @classmethod
    def from_json(cls, data: Any, limit: int = LR_POINTS) -> LRHistory | None:
        """The history stored by :meth:`to_json`; None when ``data`` is not one (absent, or another program's)."""
        try:
            h = cls(str(data.get("optimizer") or ""), limit)
            h.series = [str(s) for s in data["series"]]
            h.rows = [_checked_row(r, len(h.series)) for r in data["rows"]]
            h.stride = max(1, int(data.get("stride") or 1))
            last = data.get("last")
            h.last = _checked_row(last, len(h.series)) if last is not None else (h.rows[-1] if h.rows else None)
            h.final = [GroupRate(label=str(k), lr=_number(v.get("lr")), base_lr=_number(v.get("base_lr")),
                                 d=None if v.get("d") is None else float(v["d"]))
                       for k, v in (data.get("final") or {}).items()]
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
        return h


def _checked_row(row: Any, width: int) -> list[float | None]:
    if not isinstance(row, list) or len(row) != width + 1:
        raise ValueError("row")
    return [int(row[0]), *(None if v is None else float(v) for v in row[1:])]


def format_rate(v: float) -> str:
    """A rate in the short form users type: 8.1e-5, 1e-4, 0.001, 1."""
    if not math.isfinite(v):
        return "–"
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e3:
        return f"{v:.3g}"
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _per_value(pairs: list[tuple[float, str]]) -> list[str]:
    """``"8.1e-5 for the UNet and the text encoder"``: the groups of one (shown) value together."""
    by_value: dict[str, list[str]] = {}
    for value, label in pairs:
        by_value.setdefault(format_rate(value), []).append(_IN_TEXT.get(label, label))
    return [f"{value} for {_and(names)}" for value, names in by_value.items()]


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
