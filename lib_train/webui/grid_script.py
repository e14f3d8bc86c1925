"""The "Epoch × weight grid" script of txt2img/img2img and the Trainer axes of the built-in X/Y/Z plot.

The grid (:func:`run_grid`): the user picks a training run (LoRA runs under the Lora folder, embedding runs under
the embeddings folder, found by :func:`lib_train.grid.discover_runs`), its saved files, weights and an optional
third axis; :func:`lib_train.grid.plan_grid` gives the cells. Each cell is a copy of the user's processing object
with only the prompt's tag changed (``<lora:STEM:w>`` / ``(STEM:w)``) and the one fixed seed, rendered by the
WebUI's own ``process_images`` — so the built-in Lora extension applies each file exactly as a user's prompt will,
the progress bar counts cells (``shared.state.job_count``) and Interrupt stops after the current cell. The grid is
drawn and saved with the WebUI's helpers (``images.image_grid``, ``draw_grid_annotations``, ``save_image``) with
an infotext, like its own grids; each cell's infotext carries ``Trainer file`` / ``Trainer weight``.

Keeping a choice: the "Keep a result" controls under the script (or "Use selected cell", which reads the selected
gallery image's infotext) call :func:`lib_train.grid.keep_choice`: the weight lands in the LoRA's ``.json`` sidecar
as ``"preferred weight"`` and the file can become the run's final ``NAME.safetensors``. The API does the same with
the script's ``mode`` argument ``"keep"`` (:data:`ARG_NAMES`), which then renders one image with the kept tag.

X/Y/Z plot: :func:`register_xyz_axes` (run ``on_before_ui``, before the built-in script snapshots its axis list)
adds "Trainer: run epoch" (values: file stems of any run) and "Trainer: LoRA weight".

Imported only inside the WebUI (it uses ``modules`` inside functions; gradio at build time).
"""

from __future__ import annotations

import json
import random
from copy import copy
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

from ..errors import TrainerError
from ..grid import (INFO_RUN, SEED_LIMIT, THIRD_AXES, Cell, GridPlan, KeepResult, Run, cell_prompt,
                    choice_from_infotext, discover_runs, find_run, format_weight, keep_choice, plan_grid,
                    set_last_lora_weight)

TITLE = "Epoch × weight grid"
XYZ_FILE_AXIS = "Trainer: run epoch"
XYZ_WEIGHT_AXIS = "Trainer: LoRA weight"
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
    from .jobs import METHODS

    return [(name, webui.output_root()) for name, webui in METHODS.items()]


def list_runs() -> list[Run]:
    runs: list[Run] = []
    for kind, root in run_roots():
        runs += discover_runs(root, kind)
    return runs


def refresh_webui_lists(run: Run) -> None:
    """Make the WebUI see changed files of ``run`` (the Lora cards, the embedding database)."""
    from .jobs import METHODS

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
    from .jobs import METHODS

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
    """Find the run, keep the choice (:func:`lib_train.grid.keep_choice`) and refresh the WebUI's lists."""
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


# ---------------------------------------------------------------- UI

def _file_choices(run: Run | None) -> list[tuple[str, str]]:
    return [(f"{f.label} · {f.stem}", f.stem) for f in run.files] if run else []


def _summary(run: Run | None, roots: list[tuple[str, str]] | None = None) -> str:
    if run is None:
        where = " and ".join(f"`{root}`" for _, root in roots or [])
        return ("No training runs found" + (f" in {where}" if where else "") + ". A run is a folder with "
                "`NAME.safetensors` and its epoch saves (`NAME-000001.safetensors`…) or `NAME.config.json`.")
    return (f"**{run.name}** — {len(run.files)} file(s) in `{run.folder}`. Columns are files, rows weights; every "
            "image uses the same seed.")


def _safe_runs() -> tuple[list[Run], str]:
    try:
        return list_runs(), ""
    except Exception as e:  # noqa: BLE001 - the UI must build even when a folder cannot be read
        return [], f"Could not list runs: {e}"


def _run_by_label(runs: list[Run], label: str | None) -> Run | None:
    return next((r for r in runs if r.label == label), None)


def build_ui(script, is_img2img: bool) -> list:
    """The script's controls (returned in :data:`ARG_NAMES` order) and their events."""
    import gradio as gr
    from modules.ui_components import ToolButton

    runs, problem = _safe_runs()
    labels = [r.label for r in runs]
    first = runs[0] if runs else None
    tab = "img2img" if is_img2img else "txt2img"

    with gr.Row():
        run_dd = gr.Dropdown(label="Training run", choices=labels, value=labels[0] if labels else None,
                             elem_id=script.elem_id("run"))
        refresh = ToolButton(value="\U0001f504", elem_id=script.elem_id("refresh"))
    files = gr.CheckboxGroup(label="Files: the columns (none ticked = all)", choices=_file_choices(first),
                             value=[f.stem for f in first.files] if first else [], elem_id=script.elem_id("files"))
    weights = gr.Textbox(label="Weights: the rows", value=DEFAULT_WEIGHTS, elem_id=script.elem_id("weights"),
                         placeholder="0.2-1.0 (+0.2)  ·  0.2-1.0 [5]  ·  0.4, 0.7, 1")
    with gr.Row():
        third_kind = gr.Radio(label="Third axis", choices=list(THIRD_AXES), value="Nothing",
                              elem_id=script.elem_id("third_kind"))
        third_values = gr.Textbox(label="Third axis values: one prompt per line, or seeds (1, 2, -1)", lines=2,
                                  elem_id=script.elem_id("third_values"))
    with gr.Row():
        draw_legend = gr.Checkbox(label="Draw labels", value=True, elem_id=script.elem_id("draw_legend"))
        include_cells = gr.Checkbox(label="Also show each image", value=True,
                                    elem_id=script.elem_id("include_cells"))
    info = gr.Markdown(problem or _summary(first, None if runs else _safe_roots()))
    with gr.Accordion("Keep a result", open=False):
        with gr.Row():
            keep_file = gr.Dropdown(label="File", choices=[f.stem for f in first.files] if first else [],
                                    value=first.files[-1].stem if first else None,
                                    elem_id=script.elem_id("keep_file"))
            keep_weight = gr.Number(label="Weight (preferred weight of the Lora card)", value=1.0,
                                    elem_id=script.elem_id("keep_weight"))
        keep_promote = gr.Checkbox(label="Also make it the run's final NAME.safetensors (the file it replaces is "
                                         "kept under its epoch name)", value=False,
                                   elem_id=script.elem_id("keep_promote"))
        with gr.Row():
            use_cell = gr.Button(value="Use selected cell", elem_id=script.elem_id("use_cell"))
            keep_button = gr.Button(value="Keep this choice", elem_id=script.elem_id("keep"))
        status = gr.Markdown("")
    mode = gr.Textbox(value="grid", visible=False, elem_id=script.elem_id("mode"))
    for c in (run_dd, keep_file, keep_weight, keep_promote, mode):
        c.do_not_save_to_config = True  # run-specific: not remembered in ui-config.json

    def on_run(label):
        runs_now, _ = _safe_runs()
        run = _run_by_label(runs_now, label)
        return _run_updates(gr, run, runs_now)

    def on_refresh(label):
        runs_now, problem_now = _safe_runs()
        labels_now = [r.label for r in runs_now]
        label = label if label in labels_now else (labels_now[0] if labels_now else None)
        run = _run_by_label(runs_now, label)
        files_u, keep_u, info_u = _run_updates(gr, run, runs_now)
        if problem_now:
            info_u = gr.update(value=problem_now)
        return gr.update(choices=labels_now, value=label), files_u, keep_u, info_u

    def on_keep(label, stem, weight, promote):
        return _keep_message(label, stem, weight, promote)

    def on_use_cell(generation_info, index, label, promote):
        return _use_cell(gr, generation_info, index, label, promote)

    run_dd.change(fn=on_run, inputs=[run_dd], outputs=[files, keep_file, info])
    refresh.click(fn=on_refresh, inputs=[run_dd], outputs=[run_dd, files, keep_file, info])
    keep_button.click(fn=on_keep, inputs=[run_dd, keep_file, keep_weight, keep_promote], outputs=[status])

    def wire_use_cell(component) -> None:
        from .ui import js_kwarg

        use_cell.click(fn=on_use_cell, inputs=[component.component, keep_weight, run_dd, keep_promote],
                       outputs=[keep_file, keep_weight, status],
                       **js_kwarg("(info, w, run, promote) => [info, selected_gallery_index(), run, promote]"))

    # the gallery's hidden generation_info box is built after the scripts: wire the button when it appears
    script.on_after_component(wire_use_cell, elem_id=f"generation_info_{tab}")
    script.infotext_fields = [(weights, "Trainer weights")]
    return [run_dd, files, weights, third_kind, third_values, draw_legend, include_cells,
            keep_file, keep_weight, keep_promote, mode]


def _safe_roots() -> list[tuple[str, str]]:
    try:
        return run_roots()
    except Exception:  # noqa: BLE001
        return []


def _run_updates(gr, run: Run | None, runs: list[Run]):
    stems = [f.stem for f in run.files] if run else []
    return (gr.update(choices=_file_choices(run), value=stems),
            gr.update(choices=stems, value=stems[-1] if stems else None),
            gr.update(value=_summary(run, None if runs else _safe_roots())))


def _keep_message(label: str, stem: str, weight, promote: bool) -> str:
    try:
        w = float(weight) if weight not in (None, "") else None
        _, result = keep(label, stem, w, bool(promote))
    except TrainerError as e:
        return f"**Not kept:** {e}"
    return " ".join(result.messages)


def _use_cell(gr, generation_info: str, index, label: str, promote: bool):
    """Keep the gallery's selected cell (its infotext names the file and weight)."""
    try:
        info = json.loads(generation_info or "{}")
        texts = info.get("infotexts") or []
        i = int(index) if index is not None else -1
    except (ValueError, TypeError, AttributeError):
        texts, i = [], -1
    if not 0 <= i < len(texts):
        return gr.update(), gr.update(), "**Not kept:** select one image of a grid in the gallery first."
    choice = choice_from_infotext(texts[i])
    if choice is None:
        return gr.update(), gr.update(), ("**Not kept:** the selected image is not a cell of an epoch × weight "
                                          "grid (the grid itself has no single file); select a cell.")
    stem, weight = choice
    runs, _ = _safe_runs()
    current = _run_by_label(runs, label)
    run_key = label if current is not None and stem in current.stems else stem
    message = _keep_message(run_key, stem, weight, promote)
    return gr.update(value=stem), gr.update(value=weight), message


# ---------------------------------------------------------------- X/Y/Z plot axes

def _xyz_runs(p) -> dict[str, Run]:
    runs = getattr(p, "_trainer_xyz_runs", None)
    if runs is None:
        runs = {f.stem: r for r in list_runs() for f in r.files}
    return runs


def _xyz_confirm_files(p, xs) -> None:
    runs = {f.stem: r for r in list_runs() for f in r.files}
    unknown = [x for x in xs if x not in runs]
    if unknown:
        raise TrainerError(f"{XYZ_FILE_AXIS}: no run has a file {', '.join(map(str, unknown))}; give file stems "
                           "such as mychar-000002 (the dropdown lists them)")
    p._trainer_xyz_runs = runs  # the cells are copies of p: they find the runs here


def _xyz_render(p) -> None:
    state = p._trainer_xyz
    stem = state.get("file")
    if stem is not None:
        run = _xyz_runs(p).get(stem)
        if run is None:
            raise TrainerError(f"{XYZ_FILE_AXIS}: no run has a file {stem}")
        p.prompt = cell_prompt(run, p.prompt, stem, state.get("weight"))


def _xyz_apply_file(p, x, xs) -> None:
    p._trainer_xyz = {**getattr(p, "_trainer_xyz", {}), "file": x}
    _xyz_render(p)


def _file_axis_in_use() -> bool:
    from modules import shared

    axes = [getattr(shared.state, f"xyz_plot_{k}", None) for k in "xyz"]
    return any(a is not None and getattr(a.axis, "label", None) == XYZ_FILE_AXIS for a in axes)


def _xyz_apply_weight(p, x, xs) -> None:
    p._trainer_xyz = {**getattr(p, "_trainer_xyz", {}), "weight": float(x)}
    if "file" in p._trainer_xyz:
        _xyz_render(p)
    elif not _file_axis_in_use():  # (with the file axis, its apply comes later and uses this weight)
        p.prompt = set_last_lora_weight(p.prompt, float(x))


def _xyz_format_file(p, opt, x) -> str:
    run = _xyz_runs(p).get(x)
    if run is None:
        return str(x)
    return f"{run.name} {run.file(x).label}"


def _xyz_format_weight(p, opt, x) -> str:
    return f"weight {format_weight(x)}"


def _xyz_choices() -> list[str]:
    try:
        return [f.stem for r in list_runs() for f in r.files]
    except Exception:  # noqa: BLE001 - a choices callback must not break the X/Y/Z UI
        return []


def find_xyz_module():
    """The loaded built-in X/Y/Z plot script module (None when it is disabled)."""
    from modules import scripts

    for data in scripts.scripts_data:
        if os.path.basename(data.path) == "xyz_grid.py" and hasattr(data.module, "AxisOption"):
            return data.module
    return None


def register_xyz_axes(*_args) -> None:
    """Add the Trainer axes to the X/Y/Z plot (``on_before_ui``: its UI copies the axis list when built). A
    failure is reported in the log, never raised: the rest of the WebUI must come up."""
    from modules import errors

    try:
        xyz = find_xyz_module()
        if xyz is None:
            return
        known = {opt.label for opt in xyz.axis_options}
        axes = [
            xyz.AxisOption(XYZ_FILE_AXIS, str, _xyz_apply_file, format_value=_xyz_format_file,
                           confirm=_xyz_confirm_files, cost=0.5, choices=_xyz_choices),
            xyz.AxisOption(XYZ_WEIGHT_AXIS, float, _xyz_apply_weight, format_value=_xyz_format_weight),
        ]
        xyz.axis_options.extend(a for a in axes if a.label not in known)
    except Exception:  # noqa: BLE001
        errors.report("sd-webui-trainer: could not add the Trainer axes to the X/Y/Z plot", exc_info=True)
