"""The Trainer tab's "Prepare dataset" panel: upload images into a run folder, then preprocess a folder with the
WebUI's own postprocessing (crop / focal crop / auto-sized crop, split, flipped copies, BLIP / DeepBooru captions)
into a processed folder that is put into the tab's dataset field.

Like :mod:`.build`, the builder never imports the WebUI: what the buttons do comes in as callables
(:mod:`lib_train.webui.preprocess` has the real ones), so the panel builds and its handlers run with plain gradio
(tests/test_ui_preprocess.py). The Preprocess click goes through ``wrap_gpu_call`` (the WebUI's
``wrap_gradio_gpu_call``: queue lock, ``shared.state``, a progress task) with a task id as the first input, which
the panel's inline JS fills in and follows with the WebUI's ``requestProgress`` above the panel's result.
Only gradio APIs present in 3.41 and 4.x are used (``gr.update``, no ``.style()``).
"""

from __future__ import annotations

import html
from typing import Any, Callable, Sequence

import gradio as gr

from ...data.preprocess_plan import AUTO_OBJECTIVES, CAPTION_ACTIONS, DEST_ACTIONS, RESIZE_MODES, \
    PreprocessOptions
from ...errors import TrainerError
from ..gradio_compat import js_kwarg
from . import render

ELEM = "sd_trainer_pp_"  # elem_id prefix of the panel's components
CAPTIONERS = ("DeepBooru", "BLIP")  # the captioner choice → caption_deepbooru / caption_blip
RESULT_FILES_SHOWN = 12

# _js of the Preprocess button: a fresh task id in the first input, and the WebUI's progress bar over the result.
START_JS = ("(...args) => { const id = randomId(); requestProgress(id, gradioApp().getElementById("
            f"'{ELEM}result'), null, () => {{}}); args[0] = id; return args; }}")

RESIZE_LABELS = {
    "crop": "crop: scale to cover width×height, cut the middle",
    "focal": "focal: crop around faces / detail (focal point)",
    "auto": "auto: centre crop to a size chosen per image",
    "none": "none: keep each image's size",
}
CAPTION_ACTION_INFO = ("when an image already has a caption file — ignore: keep it (generate only where there is "
                       "none); prepend: new, existing; append: existing, new; overwrite: replace it")
DEST_ACTION_INFO = ("if the processed folder is not empty — stop: refuse; overwrite: replace files of the same "
                    "name, keep the rest; clear: delete its images and captions first")


def _fields(upscalers: Sequence[str]) -> dict[str, Callable[[], gr.components.Component]]:
    d = PreprocessOptions()
    upscaler_choices = list(dict.fromkeys([d.upscaler, *upscalers]))

    def eid(key: str) -> dict[str, str]:
        return {"elem_id": ELEM + key}

    return {
        "source_dir": lambda: gr.Textbox(label="Source folder", value=d.source_dir, info="the images to prepare "
                                         "(N_name sub-folders are kept)", **eid("source_dir")),
        "dest_dir": lambda: gr.Textbox(label="Processed folder", value=d.dest_dir, placeholder="empty: "
                                       "<source>-processed next to the source", info="where the results go; "
                                       "must be outside the source", **eid("dest_dir")),
        "if_dest_exists": lambda: gr.Radio(list(DEST_ACTIONS), value=d.if_dest_exists, label="Processed folder "
                                           "not empty", info=DEST_ACTION_INFO, **eid("if_dest_exists")),
        "width": lambda: gr.Slider(64, 2048, step=8, value=d.width, label="Width", **eid("width")),
        "height": lambda: gr.Slider(64, 2048, step=8, value=d.height, label="Height", **eid("height")),
        "resize": lambda: gr.Radio(list(RESIZE_MODES), value=d.resize, label="Resize",
                                   info="; ".join(RESIZE_LABELS[m] for m in RESIZE_MODES), **eid("resize")),
        "upscaler": lambda: gr.Dropdown(upscaler_choices, value=d.upscaler, label="Upscaler for small images "
                                        "(crop)", allow_custom_value=True, **eid("upscaler")),
        "split": lambda: gr.Checkbox(value=d.split, label="Split oversized images", info="images much longer "
                                     "than width×height become overlapping pieces", **eid("split")),
        "split_threshold": lambda: gr.Slider(0.0, 1.0, step=0.05, value=d.split_threshold, label="Split "
                                             "threshold", **eid("split_threshold")),
        "split_overlap": lambda: gr.Slider(0.0, 0.9, step=0.05, value=d.split_overlap, label="Split overlap",
                                           **eid("split_overlap")),
        "flip": lambda: gr.Checkbox(value=d.flip, label="Add flipped copies", info="a mirrored copy of every "
                                    "image, with the same caption", **eid("flip")),
        "focal_face_weight": lambda: gr.Slider(0.0, 1.0, step=0.05, value=d.focal_face_weight,
                                               label="Face weight", **eid("focal_face_weight")),
        "focal_entropy_weight": lambda: gr.Slider(0.0, 1.0, step=0.05, value=d.focal_entropy_weight,
                                                  label="Entropy weight", **eid("focal_entropy_weight")),
        "focal_edges_weight": lambda: gr.Slider(0.0, 1.0, step=0.05, value=d.focal_edges_weight,
                                                label="Edges weight", **eid("focal_edges_weight")),
        "focal_debug": lambda: gr.Checkbox(value=d.focal_debug, label="Save debug images (in .focal-debug)",
                                           **eid("focal_debug")),
        "auto_min_side": lambda: gr.Slider(64, 2048, step=8, value=d.auto_min_side, label="Smallest side",
                                           **eid("auto_min_side")),
        "auto_max_side": lambda: gr.Slider(64, 2048, step=8, value=d.auto_max_side, label="Largest side",
                                           **eid("auto_max_side")),
        "auto_min_area": lambda: gr.Number(value=d.auto_min_area, precision=0, label="Smallest area (px²)",
                                           **eid("auto_min_area")),
        "auto_max_area": lambda: gr.Number(value=d.auto_max_area, precision=0, label="Largest area (px²)",
                                           **eid("auto_max_area")),
        "auto_objective": lambda: gr.Radio(list(AUTO_OBJECTIVES), value=d.auto_objective, label="Objective",
                                           **eid("auto_objective")),
        "auto_threshold": lambda: gr.Slider(0.0, 1.0, step=0.01, value=d.auto_threshold, label="Aspect error "
                                            "threshold", **eid("auto_threshold")),
        "captioners": lambda: gr.CheckboxGroup(list(CAPTIONERS), value=[], label="Generate captions",
                                               info="the WebUI's interrogators; their models are downloaded on "
                                               "first use", **eid("captioners")),
        "existing_caption": lambda: gr.Radio(list(CAPTION_ACTIONS), value=d.existing_caption,
                                             label="Existing captions", info=CAPTION_ACTION_INFO,
                                             **eid("existing_caption")),
        "caption_extension": lambda: gr.Textbox(value=d.caption_extension, label="Caption extension",
                                                **eid("caption_extension")),
    }


LAYOUT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("folders", ("source_dir", "dest_dir", "if_dest_exists")),
    ("size", ("width", "height", "resize", "upscaler")),
    ("split", ("split", "split_threshold", "split_overlap", "flip")),
    ("focal", ("focal_face_weight", "focal_entropy_weight", "focal_edges_weight", "focal_debug")),
    ("auto", ("auto_min_side", "auto_max_side", "auto_min_area", "auto_max_area", "auto_objective",
              "auto_threshold")),
    ("captions", ("captioners", "existing_caption", "caption_extension")),
)
KEYS: tuple[str, ...] = tuple(k for _, keys in LAYOUT for k in keys)
"""The panel's inputs after the task id, in order."""


def values_to_options(values: Sequence[Any]) -> dict[str, Any]:
    """The panel's values (in :data:`KEYS` order) → a dict of :class:`PreprocessOptions` fields."""
    out: dict[str, Any] = {}
    for key, value in zip(KEYS, values, strict=True):
        if key == "captioners":
            chosen = set(value or [])
            out["caption_deepbooru"], out["caption_blip"] = "DeepBooru" in chosen, "BLIP" in chosen
        else:
            out[key] = value.strip() if isinstance(value, str) else value
    return out


def _e(value: Any) -> str:
    return html.escape(str(value))


def _files(title: str, items: Sequence[str]) -> str:
    if not items:
        return ""
    shown = "".join(f"<li><code>{_e(p)}</code></li>" for p in items[:RESULT_FILES_SHOWN])
    more = f"<li>… {len(items) - RESULT_FILES_SHOWN} more</li>" if len(items) > RESULT_FILES_SHOWN else ""
    return f"<p>{_e(title)}</p><ul class='sd-trainer-files'>{shown}{more}</ul>"


def render_result(r: dict[str, Any]) -> str:
    """A run's result (:class:`~lib_train.data.preprocess_plan.PreprocessResult` as a dict)."""
    kind = "error" if r.get("interrupted") or not r.get("processed") else "ok"
    head = (f"{'Interrupted: ' if r.get('interrupted') else ''}{r.get('processed', 0)} of {r.get('total', 0)} "
            f"images processed into {r['output_dir']}: {len(r['images'])} image(s), {len(r['captions'])} "
            "caption file(s).")
    parts = [render.message(head, kind)]
    if kind == "ok":
        parts.append(render.message("The processed folder is now the dataset folder above; press Scan to "
                                    "check it."))
    if r.get("notes"):
        parts.append("<p>Notes:</p><ul class='sd-trainer-notes'>"
                     + "".join(f"<li>{_e(n)}</li>" for n in r["notes"]) + "</ul>")
    parts.append(_files("Images:", r["images"]))
    return "<div class='sd-trainer-preprocess'>" + "".join(parts) + "</div>"


def render_upload(r: dict[str, Any]) -> str:
    parts = [render.message(f"Stored {len(r['stored'])} file(s) in {r['folder']}"
                            + (f" ({r['replaced']} replaced files of the same name)" if r.get("replaced") else "")
                            + ". The source folder is set to the run folder.", "ok")]
    if r.get("rejected"):
        parts.append("<div class='sd-trainer-warning'><p>Not stored:</p><ul class='sd-trainer-problems'>"
                     + "".join(f"<li><code>{_e(p['file'])}</code>: {_e(p['message'])}</li>" for p in r["rejected"])
                     + "</ul></div>")
    return "".join(parts)


class _PanelHandlers:
    """The panel's event functions (plain Python: values in, values/HTML out)."""

    def __init__(self, preprocess: Callable[[dict[str, Any]], dict[str, Any]], upload: Callable[..., dict[str, Any]]):
        self.backend_preprocess, self.backend_upload = preprocess, upload

    def preprocess(self, task_id: str, *values: Any) -> tuple[Any, str]:
        """→ (the dataset-folder field: the processed folder after a complete run, else unchanged; the report)."""
        try:
            result = self.backend_preprocess(values_to_options(values))
        except TrainerError as e:
            return gr.update(), render.error(e)
        done = result.get("processed", 0) > 0 and not result.get("interrupted")
        return (gr.update(value=result["output_dir"]) if done else gr.update()), render_result(result)

    def upload(self, files: Any, run: str, repeats: Any, concept: str, caption_extension: str) -> tuple[Any, str]:
        """→ (the source-folder field: the run folder after an upload, else unchanged; the report)."""
        if not files:
            return gr.update(), render.message("Choose the images to upload first.", "error")
        try:
            reps = int(repeats) if repeats is not None and float(repeats).is_integer() else repeats
            result = self.backend_upload(list(files), (run or "").strip(), reps, (concept or "").strip(),
                                         (caption_extension or ".txt").strip())
        except TrainerError as e:
            return gr.update(), render.error(e)
        return gr.update(value=result["run_dir"]), render_upload(result)


def _no_wrap(fn: Callable, extra_outputs: Any = None) -> Callable:
    return fn


def build_preprocess_panel(backend_preprocess: Callable[[dict[str, Any]], dict[str, Any]],
                           backend_upload: Callable[..., dict[str, Any]], train_dir_component: Any, *,
                           wrap_gpu_call: Callable[..., Callable] = _no_wrap,
                           upscalers: Sequence[str] = (),
                           backend_interrupt: Callable[[], None] | None = None) -> None:
    """Build the panel inside the caller's current gradio context (a ``gr.Blocks``/``Column``), wired to
    ``train_dir_component`` (the tab's dataset-folder textbox, set to the processed folder after a run).

    ``backend_preprocess(options: dict) -> result dict`` and ``backend_upload(files, run, repeats, concept,
    caption_extension) -> upload dict`` raise TrainerError subclasses for what the user can fix;
    ``wrap_gpu_call(fn, extra_outputs=[...])`` runs the Preprocess click under the WebUI's queue and progress;
    ``upscalers`` are the choices for the crop mode's upscaler; ``backend_interrupt()`` (optional) adds a Stop
    button that ends a run after its current image."""
    h = _PanelHandlers(backend_preprocess, backend_upload)
    makers = _fields(upscalers)
    comps: dict[str, gr.components.Component] = {}

    def row(group: str) -> None:
        keys = next(keys for gid, keys in LAYOUT if gid == group)
        with gr.Row(variant="compact"):
            for key in keys:
                comps[key] = makers[key]()

    with gr.Accordion("Prepare dataset (WebUI preprocessing)", open=False, elem_id=ELEM + "panel"):
        gr.HTML(render.message("Upload images or give a folder; preprocessing writes cropped / split / flipped "
                               "PNGs with captions into a separate processed folder, keeping the N_name "
                               "repeat folders, and puts it into the dataset field."))
        with gr.Row(equal_height=False):
            files = gr.File(label="Upload images (and .txt captions)", file_count="multiple",
                            elem_id=ELEM + "upload_files")
            with gr.Column():
                with gr.Row(variant="compact"):
                    run_name = gr.Textbox(label="Run name", placeholder="mychar", elem_id=ELEM + "upload_run",
                                          info="uploads go to <WebUI data>/trainer-datasets/<run>/")
                    repeats = gr.Number(label="Repeats (N of N_name)", value=10, precision=0,
                                        elem_id=ELEM + "upload_repeats")
                    concept = gr.Textbox(label="Concept name", placeholder="empty: the run name",
                                         elem_id=ELEM + "upload_concept")
                upload = gr.Button("Upload", elem_id=ELEM + "upload")
        row("folders")
        row("size")
        row("split")
        with gr.Accordion("Focal point crop (resize: focal)", open=False, elem_id=ELEM + "group_focal"):
            row("focal")
        with gr.Accordion("Auto-sized crop (resize: auto)", open=False, elem_id=ELEM + "group_auto"):
            row("auto")
        row("captions")
        task_id = gr.Textbox(visible=False, elem_id=ELEM + "task_id")
        with gr.Row():
            start = gr.Button("Preprocess", variant="primary", elem_id=ELEM + "start")
            stop = gr.Button("Stop", elem_id=ELEM + "stop", visible=backend_interrupt is not None)
        result = gr.HTML(elem_id=ELEM + "result")

    inputs = [comps[k] for k in KEYS]
    start.click(fn=wrap_gpu_call(h.preprocess, extra_outputs=[gr.update()]), inputs=[task_id, *inputs],
                outputs=[train_dir_component, result], **js_kwarg(START_JS))
    if backend_interrupt is not None:
        stop.click(fn=backend_interrupt, inputs=[], outputs=[])
    upload.click(fn=h.upload, inputs=[files, run_name, repeats, concept, comps["caption_extension"]],
                 outputs=[comps["source_dir"], result])
