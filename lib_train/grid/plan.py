"""The grid plan: a run, the chosen files, a weight spec and an optional third axis (prompts or seeds) become
:class:`Cell` objects — files across, weights down, one fixed seed — and a cell's infotext names its file and
weight (:func:`choice_from_infotext` reads them back)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import TrainerError
from .axes import SEED_LIMIT, ThirdValue, fix_seed, format_weight, parse_third_axis, parse_weights
from .prompts import cell_prompt
from .runs import Run, RunFile, select_files

MAX_CELLS = 400
INFO_FILE = "Trainer file"
INFO_WEIGHT = "Trainer weight"
INFO_RUN = "Trainer run"


@dataclass(frozen=True)
class Cell:
    col: int  # file index (epochs across)
    row: int  # row index: third-axis value × weights down
    file: RunFile
    weight: float
    third: ThirdValue
    prompt: str
    seed: int

    @property
    def infotext_params(self) -> dict[str, str]:
        """What the cell adds to its infotext; :func:`choice_from_infotext` reads it back."""
        return {INFO_FILE: self.file.stem, INFO_WEIGHT: format_weight(self.weight)}


@dataclass(frozen=True)
class GridPlan:
    run: Run
    files: list[RunFile]
    weights: list[float]
    third: list[ThirdValue]
    seed: int
    cells: list[Cell] = field(default_factory=list)  # in generation order: file, then third value, then weight

    @property
    def cols(self) -> int:
        return len(self.files)

    @property
    def rows(self) -> int:
        return len(self.weights) * len(self.third)

    def index(self, cell: Cell) -> int:
        """The cell's position in the grid, row-major (what ``image_grid`` expects)."""
        return cell.row * self.cols + cell.col

    def col_labels(self) -> list[list[str]]:
        return [[f.label] for f in self.files]

    def row_labels(self) -> list[list[str]]:
        rows = []
        for t in self.third:
            for w in self.weights:
                rows.append(([t.label] if t.label else []) + [f"weight {format_weight(w)}"])
        return rows


def plan_grid(run: Run, *, files: Sequence[str] | str | None, weights: str, prompt: str, seed: int,
              third_kind: str = "Nothing", third_values: str = "",
              draw: Callable[[], int] | None = None) -> GridPlan:
    """The cells of a grid: the run's chosen ``files`` (None/empty = all) across, ``weights`` down, repeated for
    each third-axis value. ``seed`` -1 is drawn once with ``draw``; a seeds axis overrides it per row block."""
    import random

    draw = draw or (lambda: random.randrange(SEED_LIMIT))
    chosen = select_files(run, files)
    ws = parse_weights(weights)
    third = parse_third_axis(third_kind, third_values, draw)
    base_seed = fix_seed(seed, draw)
    if len(chosen) * len(ws) * len(third) > MAX_CELLS:
        raise TrainerError(f"weights: {len(chosen)} files × {len(ws)} weights × {len(third)} = "
                           f"{len(chosen) * len(ws) * len(third)} images; at most {MAX_CELLS} in one grid")
    cells = []
    for col, f in enumerate(chosen):
        for k, t in enumerate(third):
            base = t.prompt if t.prompt is not None else prompt
            for j, w in enumerate(ws):
                cells.append(Cell(col=col, row=k * len(ws) + j, file=f, weight=w, third=t,
                                  prompt=cell_prompt(run, base, f.stem, w),
                                  seed=t.seed if t.seed is not None else base_seed))
    return GridPlan(run, chosen, ws, third, base_seed, cells)


def choice_from_infotext(text: str) -> tuple[str, float] | None:
    """(file stem, weight) of a cell's infotext (see :attr:`Cell.infotext_params`); None for other images."""
    def value(key: str) -> str | None:
        m = re.search(rf"(?:^|[,\n]\s*){re.escape(key)}:\s*(\"(?:[^\"\\]|\\.)*\"|[^,\n]*)", text or "")
        if not m:
            return None
        raw = m.group(1).strip()
        if raw.startswith('"'):
            try:
                return json.loads(raw)
            except ValueError:
                return None
        return raw

    stem, weight = value(INFO_FILE), value(INFO_WEIGHT)
    if not stem or weight is None:
        return None
    try:
        return stem, float(weight)
    except ValueError:
        return None
