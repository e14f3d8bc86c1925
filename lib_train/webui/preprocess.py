"""Dataset preprocessing inside the WebUI, with the WebUI's own code: the image operations of a
:class:`~lib_train.data.preprocess_plan.PreprocessPlan` are built from the WebUI's "postprocessing for training"
scripts, its autocrop module and its BLIP / DeepBooru interrogators; progress and Interrupt go through
``shared.state``. The plan (folders, names, captions, uploads) is :mod:`lib_train.data.preprocess_plan`.

Why the scripts' ``process`` methods and not ``modules.postprocessing.run_postprocessing`` (the Extras batch):
that function lists one flat folder (the ``N_name`` folders of a dataset would be lost), saves through the user's
Extras settings (file format, name pattern, PNG info), skips unreadable images silently, opens and closes
``shared.state`` itself (inside a queued call this resets the task's progress), runs every postprocessing script of
every extension in the user's order, and merges captions by a global option with a space. Calling the scripts
directly keeps the structure, the order and the names ours while the image work stays the WebUI's:

- split: "Split oversized images" (its target size set in ``pp.shared`` as the Upscale script's first pass does);
- auto: "Auto-sized crop"; crop: that script module's ``center_crop`` (one Lanczos resample to exactly
  width×height; the Upscale script's own crop pastes onto a black canvas after rounding the size down to a multiple
  of 8, which leaves black bars for about 7 % of image sizes); an upscaler other than Lanczos/None enlarges small
  images first through the "Upscale" script (no crop), then ``center_crop`` fits them;
- focal: ``modules.textual_inversion.autocrop`` (the "Auto focal point crop" script retries the face-model
  download for every image and prints a traceback each time when offline; here it is tried once, and OpenCV's Haar
  cascades are used without it, as the script does);
- flip: "Create flipped copies" (horizontal);
- captions: ``deepbooru.model`` and ``shared.interrogator.generate_caption`` (BLIP), loaded once before the first
  image. The "Caption" script runs the full CLIP interrogation, which opens and closes ``shared.state`` on every
  image (progress and Interrupt of the run would be lost) and turns a load failure into the caption "<error>".
  A model that cannot be loaded (offline: the WebUI downloads it on first use) stops the run before anything is
  written, with a :class:`TrainerError` naming the model, the file and what to do.

Entry points: :func:`backend_preprocess` (the tab, inside ``wrap_gradio_gpu_call``), :func:`preprocess_route`
(``POST /trainer/v1/preprocess``), :func:`backend_upload` (the tab's upload button), :func:`interrupt_preprocess`
(its Stop button), :func:`upscaler_names`.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageOps

from ..data.preprocess_plan import Hooks, Operations, PreprocessOptions, PreprocessPlan, default_dest, make_plan, \
    options_from_dict, run_plan, store_uploads
from ..atomic import is_within
from ..errors import ConfigError, Problem, ProblemsError, TrainerError

UPLOAD_SUBFOLDER = "trainer-datasets"  # uploads go to <WebUI data dir>/trainer-datasets/<run>/<N>_<concept>/
PLAIN_RESAMPLERS = ("Lanczos", "None", "")  # crop mode needs no upscaler model for these
SCRIPT_SPLIT = "Split oversized images"
SCRIPT_AUTO = "Auto-sized crop"
SCRIPT_FLIP = "Create flipped copies"
SCRIPT_UPSCALE = "Upscale"
_SCRIPTS_EXTENSION = "postprocessing-for-training"  # the built-in extension that holds the first three


def upload_root() -> str:
    """``<data dir>/trainer-datasets`` (``--data-dir``; default: the WebUI folder)."""
    from modules import paths_internal

    return os.path.join(paths_internal.data_path, UPLOAD_SUBFOLDER)


def upscaler_names() -> list[str]:
    """The WebUI's upscalers, for the crop mode's upscaler choice."""
    from modules import shared

    return [u.name for u in shared.sd_upscalers]


# ------------------------------------------------------------------------------------------------ the scripts

def _script(name: str) -> tuple[Any, Any]:
    """(a new instance, its module) of the WebUI's postprocessing script titled ``name``."""
    from modules import scripts

    for data in scripts.postprocessing_scripts_data:
        if getattr(data.script_class, "name", None) == name:
            return data.script_class(), data.module
    where = f"the built-in extension '{_SCRIPTS_EXTENSION}'" if name != SCRIPT_UPSCALE else "the WebUI's scripts"
    raise TrainerError(f"The WebUI's postprocessing script '{name}' is not loaded (it comes with {where}; enable "
                       "it in Extensions → Installed and restart), so this preprocessing option cannot run.")


def _pp(image: Image.Image, width: int, height: int):
    from modules.scripts_postprocessing import PostprocessedImage

    pp = PostprocessedImage(image)
    pp.shared.target_width, pp.shared.target_height = width, height  # what the Upscale script's first pass sets
    return pp


def _extras(pp) -> list[Image.Image]:
    return [getattr(extra, "image", extra) for extra in pp.extra_images]


def _fitter(width: int, height: int) -> Callable[[Image.Image], Image.Image]:
    """Scale to cover width×height and cut the middle, exactly that size (the auto-sized crop script's
    ``center_crop``; Pillow's ``ImageOps.fit`` where a WebUI version lacks it)."""
    _, module = _script(SCRIPT_AUTO)
    center_crop = getattr(module, "center_crop", None)
    if center_crop is None:
        return lambda image: ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    return lambda image: image if image.size == (width, height) else center_crop(image, width, height)


Transform = Callable[[Image.Image], Image.Image]


def _resize_op(o: PreprocessOptions, fit: Transform) -> Transform:
    if o.upscaler in PLAIN_RESAMPLERS:
        return fit
    script, _ = _script(SCRIPT_UPSCALE)

    def resize(image: Image.Image) -> Image.Image:
        if image.width >= o.width and image.height >= o.height:
            return fit(image)
        pp = _pp(image, o.width, o.height)
        try:
            script.process(pp, upscale_enabled=True, upscale_mode=1, upscale_by=1.0, max_side_length=0,
                           upscale_to_width=o.width, upscale_to_height=o.height, upscale_crop=False,
                           upscaler_1_name=o.upscaler, upscaler_2_name=None, upscaler_2_visibility=0.0)
        except Exception as e:
            raise TrainerError(f"The upscaler '{o.upscaler}' failed ({type(e).__name__}: {e}). Its model may not "
                               "be downloaded yet (the WebUI fetches it on first use, which needs an internet "
                               "connection); choose 'Lanczos', or use it once in Extras while online.") from e
        return fit(pp.image)

    return resize


def _split_op(o: PreprocessOptions, fit: Callable) -> Callable[[Image.Image], list[Image.Image]]:
    script, _ = _script(SCRIPT_SPLIT)

    def split(image: Image.Image) -> list[Image.Image]:
        pp = _pp(image, o.width, o.height)
        script.process(pp, enable=True, split_threshold=o.split_threshold, overlap_ratio=o.split_overlap)
        if not pp.extra_images:
            return []
        return [fit(piece) for piece in [pp.image, *_extras(pp)]]  # fit: a no-op unless rounding lost a pixel

    return split


def _auto_op(o: PreprocessOptions) -> Callable[[Image.Image], Image.Image | None]:
    script, _ = _script(SCRIPT_AUTO)

    def auto(image: Image.Image) -> Image.Image | None:
        pp = _pp(image, o.width, o.height)
        script.process(pp, enable=True, mindim=o.auto_min_side, maxdim=o.auto_max_side, minarea=o.auto_min_area,
                       maxarea=o.auto_max_area, objective=o.auto_objective, threshold=o.auto_threshold)
        return None if pp.image is image else pp.image

    return auto


def _flip_op() -> Callable[[Image.Image], Image.Image]:
    script, _ = _script(SCRIPT_FLIP)

    def flip(image: Image.Image) -> Image.Image:
        pp = _pp(image, image.width, image.height)
        script.process(pp, enable=True, option=["Horizontal"])
        return _extras(pp)[0]

    return flip


def _focal_op(o: PreprocessOptions, fit: Callable, notes: list[str]) -> Callable[[Image.Image], list[Image.Image]]:
    from modules.textual_inversion import autocrop

    face_model = None
    if o.focal_face_weight > 0:
        try:
            face_model = autocrop.download_and_cache_models()
        except Exception as e:
            notes.append("The face-detection model for the focal-point crop could not be downloaded "
                         f"({type(e).__name__}); faces were found with OpenCV's Haar cascades instead (lower "
                         "quality).")

    def settings(model_path: str | None):
        return autocrop.Settings(crop_width=o.width, crop_height=o.height, face_points_weight=o.focal_face_weight,
                                 entropy_points_weight=o.focal_entropy_weight,
                                 corner_points_weight=o.focal_edges_weight, annotate_image=o.focal_debug,
                                 dnn_model_path=model_path)

    def focal(image: Image.Image) -> list[Image.Image]:
        nonlocal face_model
        try:
            crop, *debug = autocrop.crop_image(image, settings(face_model))
        except Exception as e:
            if face_model is None:
                raise
            notes.append(f"The face-detection model {face_model} could not be used ({type(e).__name__}: {e}); "
                         "OpenCV's Haar cascades were used instead. Delete the file to download it again.")
            face_model = None
            crop, *debug = autocrop.crop_image(image, settings(None))
        return [fit(crop), *debug]

    return focal


# ------------------------------------------------------------------------------------------------ captioners

def _has_file(folder: str, extension: str) -> bool:
    return os.path.isdir(folder) and any(f.endswith(extension) for _, _, fs in os.walk(folder) for f in fs)


def _model_error(model: str, folder: str, file_name: str, also: str, err: Exception) -> TrainerError:
    if _has_file(folder, Path(file_name).suffix):
        why = f"loading it failed ({type(err).__name__}: {err})"
    else:
        why = f"its model file is not in {folder} and could not be downloaded (is this computer offline?)"
    return TrainerError(
        f"{model} captions are not available: {why}. The WebUI downloads {file_name} into {folder}{also} the first "
        f"time {model} is used, which needs an internet connection once: connect and run preprocessing again (or "
        f"copy the file there yourself), or turn {model} captions off.")


def _load_deepbooru(stack: ExitStack) -> Callable[[Image.Image], str]:
    from modules import deepbooru, paths

    try:
        deepbooru.model.start()
    except Exception as e:
        raise _model_error("DeepBooru", os.path.join(paths.models_path, "torch_deepdanbooru"),
                           "model-resnet_custom_v3.pt", "", e) from e
    stack.callback(deepbooru.model.stop)
    return deepbooru.model.tag_multi


def _load_blip(stack: ExitStack) -> Callable[[Image.Image], str]:
    from modules import devices, lowvram, paths, shared

    lowvram.send_everything_to_cpu()
    devices.torch_gc()
    stack.callback(shared.interrogator.unload)
    try:
        shared.interrogator.load()
    except Exception as e:
        clip_dir = getattr(shared.cmd_opts, "clip_models_path", None) or "the CLIP cache (~/.cache/clip)"
        raise _model_error("BLIP", os.path.join(paths.models_path, "BLIP"), "model_base_caption_capfilt_large.pth",
                           f" (with its bert-base-uncased tokenizer from Hugging Face, and CLIP ViT-L/14 into "
                           f"{clip_dir})", e) from e
    return shared.interrogator.generate_caption


def _captioners(o: PreprocessOptions, stack: ExitStack) -> dict[str, Callable[[Image.Image], str]]:
    """Loaded captioners in the WebUI Caption script's order (DeepBooru tags, then BLIP); unloaded by ``stack``."""
    out = {}
    if o.caption_deepbooru:
        out["deepbooru"] = _load_deepbooru(stack)
    if o.caption_blip:
        out["blip"] = _load_blip(stack)
    return out


def build_operations(plan: PreprocessPlan, stack: ExitStack) -> Operations:
    """The run's operations, with only what its options use loaded (captioners last, after every script was
    found, so a missing script never costs a model load)."""
    o = plan.options
    fit = _fitter(o.width, o.height) if o.resize in ("crop", "focal") or o.split else None

    def unused(*_: Any) -> Any:
        raise AssertionError("an operation the options do not use was called")

    ops = Operations(resize=_resize_op(o, fit) if o.resize == "crop" else unused,
                     focal=_focal_op(o, fit, plan.notes) if o.resize == "focal" else unused,
                     auto=_auto_op(o) if o.resize == "auto" else unused,
                     split=_split_op(o, fit) if o.split else unused,
                     flip=_flip_op() if o.flip else unused)
    ops.captioners = _captioners(o, stack)
    return ops


# ------------------------------------------------------------------------------------------------ running

def _state_hooks() -> Hooks:
    from modules import shared

    state = shared.state

    def on_item(index: int, total: int, text: str) -> None:
        state.job_count, state.job_no = total, index
        state.textinfo = f"Preprocessing {min(index + 1, total)}/{total}: {text}"

    def skip_requested() -> bool:
        skipped, state.skipped = state.skipped, False
        return bool(skipped)

    return Hooks(on_item=on_item, stop_requested=lambda: bool(state.interrupted or state.stopping_generation),
                 skip_requested=skip_requested, on_image=state.assign_current_image)


def _check_upscaler(o: PreprocessOptions) -> None:
    if o.resize == "crop" and o.upscaler not in PLAIN_RESAMPLERS and o.upscaler not in upscaler_names():
        raise ConfigError([Problem("upscaler", f"'{o.upscaler}' is not one of this WebUI's upscalers: "
                                               f"{', '.join(upscaler_names())}")])


def _check_folders_allowed(o: PreprocessOptions) -> None:
    """With ``--hide-ui-dir-config`` (a shared server; the WebUI then refuses folder inputs) only folders under
    the upload folder may be read or written. Checked before anything looks into the folders, so nothing about a
    folder outside is revealed."""
    from modules import shared

    if not shared.cmd_opts.hide_ui_dir_config:
        return
    root = os.path.realpath(upload_root())
    source = o.source_dir or "."
    dest = o.dest_dir or default_dest(os.path.realpath(os.path.expanduser(source)))
    problems = [Problem(key, f"this WebUI runs with --hide-ui-dir-config, so only folders under {root} (uploads) "
                             "can be used")
                for key, folder in (("source_dir", source), ("dest_dir", dest))
                if not is_within(folder, [root]) or os.path.realpath(folder) == root]
    if problems:
        raise ConfigError(problems)


def run_preprocess(options: dict[str, Any] | PreprocessOptions) -> dict[str, Any]:
    """Plan, load, process; the caller holds the queue lock and ``shared.state`` is open. Returns
    :class:`~lib_train.data.preprocess_plan.PreprocessResult` as a dict; raises TrainerError subclasses."""
    o = options if isinstance(options, PreprocessOptions) else options_from_dict(options)
    _check_folders_allowed(o)
    _check_upscaler(o)
    plan = make_plan(o)
    with ExitStack() as stack:
        ops = build_operations(plan, stack)
        return run_plan(plan, ops, _state_hooks()).to_dict()


def backend_preprocess(options: dict[str, Any]) -> dict[str, Any]:
    """The tab's Preprocess button (called inside ``wrap_gradio_gpu_call``, which holds the queue lock and opens
    ``shared.state``)."""
    return run_preprocess(options)


def interrupt_preprocess() -> None:
    """The panel's Stop button: the WebUI's Interrupt (a run stops after its current image)."""
    from modules import shared

    shared.state.interrupt()


def backend_upload(files: list[Any], run: str, repeats: int, concept: str,
                   caption_extension: str = ".txt") -> dict[str, Any]:
    """The tab's Upload button: copy the files into ``<data dir>/trainer-datasets/<run>/<repeats>_<concept>/``."""
    return store_uploads(files, upload_root(), run, repeats=repeats, concept=concept,
                         caption_extension=caption_extension).to_dict()


def preprocess_route(body: dict) -> dict:
    """``POST /trainer/v1/preprocess``: body = :class:`PreprocessOptions` fields → ``{"output_dir", "images",
    "captions", "notes", "interrupted", "processed", "total"}``. Waits for the queue lock (no generation or training
    runs meanwhile) and reports through ``shared.state`` (the WebUI's Interrupt stops it after the current image).
    Bad options → 422 with ``detail`` = ``[{"loc": ["body", option], "msg", "type"}]``; a model or script this WebUI
    cannot load → 409 with ``detail`` saying what to do."""
    from fastapi import HTTPException
    from modules import call_queue, shared

    try:
        options = options_from_dict(body)
        with call_queue.queue_lock:
            shared.state.begin(job="sd_trainer_preprocess")
            try:
                return run_preprocess(options)
            finally:
                shared.state.end()
                shared.state.interrupted = shared.state.skipped = shared.state.stopping_generation = False
    except ProblemsError as e:
        raise HTTPException(status_code=422, detail=[{"loc": ["body", p.where], "msg": p.message,
                                                      "type": "value_error.preprocess"} for p in e.problems]) from e
    except TrainerError as e:
        raise HTTPException(status_code=409, detail=str(e)) from e
