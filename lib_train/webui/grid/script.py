"""The "Epoch × weight grid" script of txt2img/img2img: its arguments, the runs in the WebUI's folders, rendering a
grid, and keeping a choice.

The grid (:func:`run_grid`): the user picks a training run (LoRA runs under the Lora folder, embedding runs under
the embeddings folder, found by :func:`lib_train.grid.runs.discover_runs`), its saved files, weights and an optional
third axis; :func:`lib_train.grid.plan.plan_grid` gives the cells. Each cell is a copy of the user's processing
object with only the prompt's tag changed (``<lora:STEM:w>`` / ``(STEM:w)``) and the one fixed seed, rendered by
the WebUI's own ``process_images`` — so the built-in Lora extension applies each file exactly as a user's prompt
will, the progress bar counts cells (``shared.state.job_count``) and Interrupt stops after the current cell. The grid
is drawn and saved with the WebUI's helpers (``images.image_grid``, ``draw_grid_annotations``, ``save_image``) with
an infotext, like its own grids; each cell's infotext carries ``Trainer file`` / ``Trainer weight``.

Keeping a choice (:func:`keep`, :func:`lib_train.grid.keep.keep_choice`): the weight lands in the LoRA's ``.json``
sidecar as ``"preferred weight"`` and the file can become the run's final ``NAME.safetensors``. The API does the
same with the script's ``mode`` argument ``"keep"`` (:data:`ARG_NAMES`), which then renders one image with the kept
tag. The controls are in :mod:`.ui`, the X/Y/Z plot axes in :mod:`.xyz`.

Imported only inside the WebUI (it uses ``modules`` inside functions).
"""

from __future__ import annotations

import random
from copy import copy
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

from ...errors import TrainerError
from ...grid.axes import SEED_LIMIT
from ...grid.keep import KeepResult, keep_choice
from ...grid.plan import INFO_RUN, Cell, GridPlan, plan_grid
from ...grid.prompts import cell_prompt
from ...grid.runs import Run, discover_runs, find_run

TITLE = "Epoch × weight grid"
DEFAULT_WEIGHTS = "0.2-1.0 (+0.2)"
GRID_BASENAME = "epoch_grid"


@dataclass
class GridArgs:
    """The script's arguments, in the order of its controls (the API's ``script_args``); missing ones default."""

    run: str = ""  # a run's label ("LoRA: mychar/mychar"), name, folder, or any of its files
    files: list[str] = field(default_factory=list)  # file stems (or labels) as columns; empty = all
    weights: str = DEFAULT_WEIGHTS
    third_kind: str = "Nothing"  # Nothing | Prompts | Seeds
    third_values: str = ""  # one prompt per line, or seeds "1, 2, -1"
    draw_legend: bool = True
    include_cells: bool = True  # return every cell after the grid
    keep_file: str = ""  # "Keep a result": the file (stem) …
    keep_weight: float = 1.0  # … at this weight …
    keep_promote: bool = False  # … also copied to the run's final NAME.safetensors
    mode: str = "grid"  # "grid", or "keep": keep the choice above and render one image with it

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> "GridArgs":
        values = {}
        for f, value in zip(fields(cls), args):
            if value is not None:
                values[f.name] = value
        a = cls(**values)
        if isinstance(a.files, str):  # "mychar-000001, mychar" from an API client
            a.files = [s.strip() for s in a.files.replace("\n", ",").split(",") if s.strip()]
        a.files = list(a.files or [])
        try:
            a.keep_weight = float(a.keep_weight) if a.keep_weight not in ("", None) else 1.0
        except (TypeError, ValueError):
            raise TrainerError(f"keep_weight: '{a.keep_weight}' is not a number") from None
        a.mode = (a.mode or "grid").strip().lower()
        if a.mode not in ("grid", "keep"):
            raise TrainerError(f"mode: '{a.mode}' is not 'grid' or 'keep'")
        return a


ARG_NAMES = [f.name for f in fields(GridArgs)]


# ---------------------------------------------------------------- runs in the WebUI's folders

def run_roots() -> list[tuple[str, str]]:
    """(kind, folder) pairs searched for runs: each method's WebUI folder (the Lora folder, ``--lora-dir``, and
    ``--embeddings-dir``)."""
    from ..jobs import METHODS

    return [(name, webui.output_root()) for name, webui in METHODS.items()]


def list_runs() -> list[Run]:
    runs: list[Run] = []
    for kind, root in run_roots():
        runs += discover_runs(root, kind)
    return runs


def refresh_webui_lists(run: Run) -> None:
    """Make the WebUI see changed files of ``run`` (the Lora cards, the embedding database)."""
    from ..jobs import METHODS

    METHODS[run.kind].refresh()


# ---------------------------------------------------------------- the grid

def _check_size(plan: GridPlan, p) -> None:
    from modules import shared

    mp = plan.cols * plan.rows * p.width * p.height / 1_000_000
    limit = getattr(shared.opts, "img_max_size_mp", 200)
    if mp >= limit:
        raise TrainerError(f"weights: the grid would have {mp:.0f} megapixels, more than the {limit} allowed "
                           "(Settings → Saving images → 'Maximum image size'); use fewer files or weights")


def _cell_processing(p, cell: Cell, run: Run):
    pc = copy(p)
    pc.prompt = cell.prompt
    pc.seed = cell.seed
    pc.styles = list(p.styles)
    pc.override_settings = dict(p.override_settings)
    pc.extra_generation_params = {**p.extra_generation_params, **cell.infotext_params, INFO_RUN: run.label}
    return pc


def run_grid(p, *args) -> Any:
    """The script's ``run``: the whole grid (or, in mode "keep", the kept choice) as a ``Processed``.

    A problem with the arguments is a :class:`TrainerError` naming the field; for an API request it becomes a 422
    answer with that message (the WebUI's API prints a traceback for any other exception)."""
    try:
        return _run(p, args)
    except TrainerError as e:
        if getattr(p, "is_api", False):
            from fastapi import HTTPException

            raise HTTPException(status_code=422, detail=str(e)) from e
        raise


def _run(p, args: Sequence[Any]) -> Any:
    a = GridArgs.from_args(args)
    if a.mode == "keep":
        return _run_keep(p, a)
    from modules import processing, shared

    run = find_run(list_runs(), a.run)
    processing.fix_seed(p)  # a seed of -1 is drawn once, for every cell
    plan = plan_grid(run, files=a.files, weights=a.weights, prompt=p.prompt, seed=p.seed,
                     third_kind=a.third_kind, third_values=a.third_values,
                     draw=lambda: random.randrange(SEED_LIMIT))
    _check_size(plan, p)
    from ..jobs import METHODS

    METHODS[run.kind].before_grid([f.stem for f in plan.files])  # the WebUI must know every file of the grid
    p.n_iter, p.batch_size = 1, 1
    shared.state.job_count = len(plan.cells)
    shared.total_tqdm.updateTotal(p.steps * len(plan.cells))
    print(f"{TITLE}: {run.label}, {plan.cols} files × {plan.rows} rows = {len(plan.cells)} images, "
          f"seed {plan.seed}")
    done: dict[int, tuple[Any, Any]] = {}  # grid index → (processed, processing)
    for n, cell in enumerate(plan.cells):
        if shared.state.interrupted or shared.state.stopping_generation:
            break
        shared.state.job = f"{TITLE}: image {n + 1} of {len(plan.cells)}"
        pc = _cell_processing(p, cell, run)
        res = processing.process_images(pc)
        if res.images:
            done[plan.index(cell)] = (res, pc)
    if not done:
        return processing.Processed(p, [], p.seed, "")
    return _assemble(p, a, plan, done)


def _assemble(p, a: GridArgs, plan: GridPlan, done: dict[int, tuple[Any, Any]]):
    from modules import images, processing, shared
    from PIL import Image, ImageColor

    order = sorted(done)
    first_res, first_pc = done[order[0]]
    w, h = first_res.images[0].size
    background = ImageColor.getcolor(shared.opts.grid_background_color, "RGB")
    tiles = [done[i][0].images[0] if i in done else Image.new("RGB", (w, h), background)
             for i in range(plan.cols * plan.rows)]
    grid = images.image_grid(tiles, rows=plan.rows)
    if a.draw_legend:
        hor = [[images.GridAnnotation(t) for t in labels] for labels in plan.col_labels()]
        ver = [[images.GridAnnotation(t) for t in labels] for labels in plan.row_labels()]
        grid = images.draw_grid_annotations(grid, w, h, hor, ver)

    total = len(plan.cells)
    grid_params = {"Script": TITLE, INFO_RUN: plan.run.label,
                   "Trainer files": ", ".join(f.stem for f in plan.files), "Trainer weights": a.weights}
    if plan.third[0].label:
        grid_params["Trainer third axis"] = f"{a.third_kind}: " + " | ".join(t.label for t in plan.third)
    if len(done) < total:
        grid_params["Trainer images"] = f"{len(done)} of {total} (interrupted)"
    gp = copy(first_pc)
    gp.extra_generation_params = {k: v for k, v in first_pc.extra_generation_params.items()
                                  if not k.startswith("Trainer ")}
    gp.extra_generation_params.update(grid_params)
    grid_info = processing.create_infotext(gp, gp.all_prompts, gp.all_seeds, gp.all_subseeds)

    if shared.opts.grid_save and not getattr(p, "do_not_save_grid", False):
        images.save_image(grid, p.outpath_grids, GRID_BASENAME, seed=plan.seed, prompt=p.prompt,
                          extension=shared.opts.grid_format, info=grid_info, grid=True, p=gp)

    cells = [done[i][0] for i in order] if a.include_cells else []
    result = processing.Processed(
        gp, [grid] + [r.images[0] for r in cells], seed=plan.seed, info=grid_info,
        all_prompts=[p.prompt] + [r.all_prompts[0] for r in cells],
        all_seeds=[plan.seed] + [r.all_seeds[0] for r in cells],
        infotexts=[grid_info] + [r.infotexts[0] for r in cells],
        index_of_first_image=1)
    result.extra_generation_params = gp.extra_generation_params
    return result


# ---------------------------------------------------------------- keeping a choice

def keep(run_key: str, stem: str, weight: float | None, promote: bool) -> tuple[Run, KeepResult]:
    """Find the run, keep the choice (:func:`lib_train.grid.keep.keep_choice`) and refresh the WebUI's lists."""
    if not stem:
        raise TrainerError("keep_file: choose the file to keep")
    runs = list_runs()
    run = find_run(runs, run_key) if run_key else find_run(runs, stem)
    result = keep_choice(run, stem, weight, promote=promote)
    refresh_webui_lists(run)
    return run, result


def _run_keep(p, a: GridArgs):
    """API mode "keep": keep ``keep_file`` at ``keep_weight`` (and promote it), then render one image with the
    tag the Lora card now inserts, as a check."""
    from modules import processing

    run, result = keep(a.run, a.keep_file, a.keep_weight, a.keep_promote)
    stem = run.name if a.keep_promote else run.file(a.keep_file).stem
    p.prompt = cell_prompt(run, p.prompt, stem, a.keep_weight)
    processing.fix_seed(p)
    p.n_iter, p.batch_size = 1, 1
    p.extra_generation_params = {**p.extra_generation_params, "Trainer kept": " ".join(result.messages)}
    for message in result.messages:
        p.comment(message)
    return processing.process_images(p)
