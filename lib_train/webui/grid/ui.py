"""The controls of the "Epoch × weight grid" script (in :data:`~.script.ARG_NAMES` order) and their events: choose a
run, its files and weights, and keep a result ("Keep this choice", or "Use selected cell", which reads the selected
gallery image's infotext).

Imported only inside the WebUI (gradio and ``modules`` at build time).
"""

from __future__ import annotations

import json

from ...errors import TrainerError
from ...grid.axes import THIRD_AXES
from ...grid.plan import choice_from_infotext
from ...grid.runs import Run
from .script import DEFAULT_WEIGHTS, keep, list_runs, run_roots


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
                             value=[f.stem for f in first.files] if first else [], visible=first is not None,
                             elem_id=script.elem_id("files"))
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
        from ..gradio_compat import js_kwarg

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
    """The files (shown only once a run is chosen: without one the list would be an empty box under its label), the
    file to keep, and the summary (which says where runs are looked for when there is none) for ``run``."""
    stems = [f.stem for f in run.files] if run else []
    return (gr.update(choices=_file_choices(run), value=stems, visible=run is not None),
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
