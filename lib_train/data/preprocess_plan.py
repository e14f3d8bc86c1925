"""Dataset preprocessing, the half that needs no WebUI: options and their validation, which source image goes where,
the caption merge rule, uploads, and the loop that runs a plan with the image operations passed in.

The WebUI half (:mod:`lib_train.webui.preprocess`) supplies those operations from the WebUI's own code (its
"postprocessing for training" scripts, autocrop and the BLIP / DeepBooru interrogators); tests pass fakes.

Rules a preprocessed folder follows, so that it can be trained at once:

* The folder structure of the source is kept: ``src/10_cat/a.jpg`` becomes ``dest/10_cat/a.png`` (the ``N_name``
  repeat folders keep their repeats). Hidden files and folders are skipped, as the dataset scan does.
* Every output is a PNG (lossless; the training scan reads it like any other image). Outputs of one source image:
  ``a.png``; the pieces of a split image ``a.png``, ``a-2.png``, …; flipped copies ``a-flipped.png``. A focal-crop
  debug image goes to the hidden ``dest/.focal-debug/`` folder, which training never reads.
* Captions (``a.txt``) are written next to their image. The source image's caption is the "existing" one; a
  generated caption (DeepBooru tags, then the BLIP sentence, joined with ", ") is merged with it by
  :func:`merge_caption`. Split pieces are captioned one by one; a flipped copy gets its original's caption.
* The destination must be outside the source (and the source outside the destination). A destination that is not
  empty is used only when ``if_dest_exists`` says how: ``overwrite`` (files of the same name are replaced, other
  files stay) or ``clear`` (its images and captions are deleted first; refused when it holds anything else).

Uploads (:func:`store_uploads`) are copied into ``<root>/<run>/<N>_<concept>/`` with their plain file names; a name
with a path in it, a hidden name, a file that is not a readable image (or a caption file) is refused, named.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from PIL import Image

from ..atomic import atomic_write, atomic_write_text, check_output_name, is_within
from ..errors import ConfigError, DatasetError, Problem, TrainerError
from ..settings import quote
from .dataset import SCAN_LIMITS, CaptionError, ScanBudget, read_caption, system_folder
from .images import IMAGE_EXTENSIONS, ImageError, is_image_file, open_training_image, probe_image

RESIZE_MODES = ("crop", "focal", "auto", "none")
"""crop: scale to cover width×height, centre crop; focal: crop around the focal point (faces, entropy, edges);
auto: centre crop to a size chosen per image (the WebUI's auto-sized crop); none: keep the size."""
CAPTION_ACTIONS = ("ignore", "prepend", "append", "overwrite")
"""What happens when an image already has a caption and a new one is generated (see :func:`merge_caption`)."""
DEST_ACTIONS = ("stop", "overwrite", "clear")
AUTO_OBJECTIVES = ("Maximize area", "Minimize error")  # the WebUI's auto-sized crop objectives, verbatim
OUTPUT_EXTENSION = ".png"
DEBUG_FOLDER = ".focal-debug"
DEFAULT_DEST_SUFFIX = "-processed"
CAPTION_JOINER = ", "
_JUNK_FILES = {".ds_store", "thumbs.db", "desktop.ini"}  # may be deleted by "clear" along with images/captions
_EXAMPLES = 5


@dataclass
class PreprocessOptions:
    """One preprocessing run (the body of ``POST /trainer/v1/preprocess``; every field has a default but the
    source)."""

    source_dir: str = ""
    dest_dir: str = ""  # "" = next to the source: ``<source>-processed``
    width: int = 512  # target size of crop, focal crop and split pieces (multiple of 8)
    height: int = 512
    resize: str = "crop"  # one of RESIZE_MODES
    upscaler: str = "Lanczos"  # crop mode: a WebUI upscaler for images smaller than the target
    focal_face_weight: float = 0.9
    focal_entropy_weight: float = 0.15
    focal_edges_weight: float = 0.5
    focal_debug: bool = False  # also write the annotated image to dest/.focal-debug/
    auto_min_side: int = 384
    auto_max_side: int = 768
    auto_min_area: int = 64 * 64
    auto_max_area: int = 640 * 640
    auto_objective: str = "Maximize area"  # one of AUTO_OBJECTIVES
    auto_threshold: float = 0.1  # the largest aspect-ratio error accepted
    split: bool = False  # split images much longer than the target's aspect into overlapping pieces
    split_threshold: float = 0.5
    split_overlap: float = 0.2
    flip: bool = False  # add a horizontally flipped copy of every output
    caption_blip: bool = False
    caption_deepbooru: bool = False
    existing_caption: str = "ignore"  # one of CAPTION_ACTIONS
    caption_extension: str = ".txt"
    if_dest_exists: str = "stop"  # one of DEST_ACTIONS

    @property
    def captioning(self) -> bool:
        return self.caption_blip or self.caption_deepbooru


OPTION_NAMES = tuple(f.name for f in fields(PreprocessOptions))
_FOLDER_OPTIONS = ("source_dir", "dest_dir")


def options_from_dict(data: dict[str, Any]) -> PreprocessOptions:
    """Options from a plain dict (the API body, the tab's values). Unknown keys and wrong types raise
    :class:`ConfigError` naming each key; values are checked by :func:`validate_options`."""
    from ..settings import coerce, path_problem

    if not isinstance(data, dict):
        raise ConfigError([Problem("body", "must be a JSON object of preprocessing options")])
    opts, problems = PreprocessOptions(), []
    for key, value in data.items():
        if key not in OPTION_NAMES:
            problems.append(Problem(key if len(key) <= 60 else key[:60] + "…",
                                    f"unknown option; known options: {', '.join(OPTION_NAMES)}"))
            continue
        try:
            coerced = coerce(value, type(getattr(opts, key)))
        except ValueError as e:
            problems.append(Problem(key, str(e)))
            continue
        problem = path_problem(coerced) if key in _FOLDER_OPTIONS and coerced else None
        if problem:  # checked before anything looks at the disk with it
            problems.append(Problem(key, problem))
            continue
        setattr(opts, key, coerced.strip() if isinstance(coerced, str) else coerced)
    if problems:
        raise ConfigError(problems)
    return opts


# ------------------------------------------------------------------------------------------------ captions

def merge_caption(existing: str | None, generated: str, action: str) -> str:
    """The caption an output gets, from the source's caption (``existing``, None/"" when there is none) and the
    generated one (DeepBooru tags and/or the BLIP sentence; "" when none was generated):

    * ``ignore`` — an existing caption is kept unchanged; the generated one is used only where there is none;
    * ``prepend`` — the generated caption goes in front of the existing one (``generated, existing``);
    * ``append`` — the generated caption goes after the existing one (``existing, generated``);
    * ``overwrite`` — the generated caption replaces the existing one (kept when nothing was generated).

    Parts are joined with ", " (tag style). The WebUI's own option names these the other way round (its
    "Prepend" puts the existing caption first); here the action always says where the *new* text goes.
    """
    existing, generated = (existing or "").strip(), (generated or "").strip()
    if action not in CAPTION_ACTIONS:
        raise ValueError(f"unknown caption action {action!r}; expected one of {CAPTION_ACTIONS}")
    if not existing or not generated:
        return existing or generated
    if action == "ignore":
        return existing
    if action == "overwrite":
        return generated
    parts = [generated, existing] if action == "prepend" else [existing, generated]
    return CAPTION_JOINER.join(parts)


def join_generated(parts: Iterable[str]) -> str:
    """The generated caption from several captioners' outputs (empty ones left out)."""
    return CAPTION_JOINER.join(p.strip() for p in parts if p and p.strip())


# ------------------------------------------------------------------------------------------------ validation

def default_dest(source: str | os.PathLike) -> Path:
    """``<source>-processed``, next to the source folder."""
    src = Path(source).expanduser()
    return src.parent / (src.name + DEFAULT_DEST_SUFFIX)


def _resolve(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _check_range(problems: list[Problem], key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        problems.append(Problem(key, f"{value} is outside {low}–{high}"))


def _check_side(problems: list[Problem], key: str, value: int) -> None:
    if not 64 <= value <= 4096:
        problems.append(Problem(key, f"{value} px is outside 64–4096"))
    elif value % 8:
        problems.append(Problem(key, f"{value} px is not a multiple of 8; use {value // 8 * 8} or "
                                     f"{value // 8 * 8 + 8}"))


def _dest_files(dest: Path) -> list[Path]:
    return sorted(p for p in dest.rglob("*") if not p.is_dir())


def _deletable(path: Path, dest: Path, caption_extension: str) -> bool:
    rel = path.relative_to(dest)
    return (is_image_file(path) or path.suffix.lower() == caption_extension.lower()
            or path.name.lower() in _JUNK_FILES or rel.parts[0] == DEBUG_FOLDER)


def _examples(paths: list[Path], root: Path) -> str:
    names = [p.relative_to(root).as_posix() for p in paths[:_EXAMPLES]]
    return ", ".join(names) + (", …" if len(paths) > _EXAMPLES else "")


def _validate_values(o: PreprocessOptions) -> list[Problem]:
    p: list[Problem] = []
    _check_side(p, "width", o.width)
    _check_side(p, "height", o.height)
    for key, value, choices in (("resize", o.resize, RESIZE_MODES), ("existing_caption", o.existing_caption,
                                CAPTION_ACTIONS), ("if_dest_exists", o.if_dest_exists, DEST_ACTIONS),
                                ("auto_objective", o.auto_objective, AUTO_OBJECTIVES)):
        if value not in choices:
            p.append(Problem(key, f"{value!r} is not one of: {', '.join(choices)}"))
    if o.resize == "crop" and not o.upscaler.strip():
        p.append(Problem("upscaler", "give an upscaler name, e.g. 'Lanczos'"))
    if o.resize == "focal":
        for key in ("focal_face_weight", "focal_entropy_weight", "focal_edges_weight"):
            _check_range(p, key, getattr(o, key), 0.0, 1.0)
        if o.focal_face_weight + o.focal_entropy_weight + o.focal_edges_weight <= 0:
            p.append(Problem("focal_face_weight", "all three focal-point weights are 0; give at least one a weight"))
    if o.resize == "auto":
        _check_side(p, "auto_min_side", o.auto_min_side)
        _check_side(p, "auto_max_side", o.auto_max_side)
        if o.auto_min_side > o.auto_max_side:
            p.append(Problem("auto_min_side", f"{o.auto_min_side} is larger than auto_max_side "
                                              f"({o.auto_max_side})"))
        if not 0 < o.auto_min_area <= o.auto_max_area:
            p.append(Problem("auto_min_area", f"need 0 < auto_min_area ({o.auto_min_area}) ≤ auto_max_area "
                                              f"({o.auto_max_area})"))
        elif o.auto_max_area < o.auto_min_side ** 2:
            p.append(Problem("auto_max_area", f"{o.auto_max_area} px² is smaller than the smallest size allowed "
                                              f"({o.auto_min_side}×{o.auto_min_side}), so no size could be chosen"))
        _check_range(p, "auto_threshold", o.auto_threshold, 0.0, 1.0)
    if o.split:
        _check_range(p, "split_threshold", o.split_threshold, 0.0, 1.0)
        _check_range(p, "split_overlap", o.split_overlap, 0.0, 0.9)
    ext = o.caption_extension
    if not ext.startswith(".") or len(ext) < 2 or check_output_name(ext[1:], "caption extension"):
        p.append(Problem("caption_extension", f"{quote(ext)} is not a file extension; use e.g. '.txt'"))
    elif ext.lower() in IMAGE_EXTENSIONS:
        p.append(Problem("caption_extension", f"{quote(ext)} is an image extension; use e.g. '.txt'"))
    return p


def _validate_folders(o: PreprocessOptions) -> tuple[list[Problem], Path | None, Path | None]:
    """Problems with the two folders, and the resolved (source, dest) when they can be used."""
    p: list[Problem] = []
    if not o.source_dir.strip():
        return [Problem("source_dir", "give the folder with the images to prepare")], None, None
    source = _resolve(o.source_dir)
    if not source.is_dir():
        what = "is a file, not a folder" if source.exists() else "does not exist; check the path"
        return [Problem("source_dir", f"{o.source_dir} {what}")], None, None
    if system_folder(source):
        return [Problem("source_dir", f"{o.source_dir} is {system_folder(source)}, not a folder of images; give "
                                      "the folder that holds them")], None, None
    dest_given = o.dest_dir.strip()
    dest = _resolve(dest_given) if dest_given else _resolve(default_dest(source))
    hint = f"pick a separate folder such as {default_dest(source)}"
    if dest == source:
        p.append(Problem("dest_dir", f"{dest} is the source folder itself; the originals would be replaced; {hint}"))
    elif is_within(dest, [source]):
        p.append(Problem("dest_dir", f"{dest} is inside the source folder {source}; a later preprocessing or "
                                     f"training run on the source would pick up the processed copies too; {hint}"))
    elif is_within(source, [dest]):
        p.append(Problem("dest_dir", f"the source folder {source} is inside {dest}; training on {dest} would also "
                                     f"use the unprocessed originals; {hint}"))
    elif dest.exists() and not dest.is_dir():
        p.append(Problem("dest_dir", f"{dest} is a file, not a folder"))
    elif dest.is_dir() and (files := _dest_files(dest)):
        if o.if_dest_exists == "stop":
            p.append(Problem("dest_dir", f"{dest} is not empty ({len(files)} files); pick an empty or new folder, "
                                         "or choose what to do with it: 'overwrite' (files with the same names "
                                         "are replaced, the others stay) or 'clear' (its images and captions are "
                                         "deleted first)"))
        elif o.if_dest_exists == "clear":
            others = [f for f in files if not _deletable(f, dest, o.caption_extension)]
            if others:
                p.append(Problem("dest_dir", f"'clear' deletes only images and caption files, but {dest} also "
                                             f"holds {len(others)} other file(s): {_examples(others, dest)}; pick "
                                             "another folder or move them away"))
    return p, (None if p else source), (None if p else dest)


def validate_options(o: PreprocessOptions) -> list[Problem]:
    """Every problem with the options and the two folders (nothing is written)."""
    return _validate_values(o) + _validate_folders(o)[0]


# ------------------------------------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class PlanItem:
    """One source image and where its outputs go."""

    source: Path
    rel_dir: Path  # its folder relative to the source root; the same folder is used under the destination
    stem: str  # the output name without extension (unique in its folder)
    caption_file: Path | None  # the source's caption file, when there is one

    @property
    def rel_path(self) -> str:
        return (self.rel_dir / self.source.name).as_posix()


@dataclass
class PreprocessPlan:
    options: PreprocessOptions
    source: Path
    dest: Path
    items: list[PlanItem]
    notes: list[str] = field(default_factory=list)
    clear: list[Path] = field(default_factory=list)  # files deleted before processing (if_dest_exists="clear")


def _source_images(source: Path, notes: list[str], problems: list[Problem]) -> list[Path]:
    """The images under ``source``, folder by folder; stops with a problem past the dataset scan's limits
    (:data:`~lib_train.data.dataset.SCAN_LIMITS`)."""
    images, unsupported = [], []
    budget = ScanBudget(SCAN_LIMITS)
    for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if not budget.spend(len(dirnames) + len(filenames), sum(map(is_image_file, filenames))):
            problems.append(Problem("source_dir", f"the listing stopped after {budget.stopped}: this is not a "
                                                  "folder of training images; give the folder that holds them"))
            return []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if is_image_file(path):
                images.append(path)
            elif path.suffix.lower() in (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".psd"):
                unsupported.append(path)
    if unsupported:
        notes.append(f"{len(unsupported)} file(s) in a format the trainer does not read were left out: "
                     f"{_examples(unsupported, source)} (convert them to PNG or JPEG)")
    return sorted(images, key=lambda p: (p.parent.relative_to(source).parts, p.name))  # folder by folder


def _plan_items(source: Path, images: list[Path], caption_extension: str) -> list[PlanItem]:
    items, used = [], {}
    for path in images:
        rel_dir = path.parent.relative_to(source)
        taken = used.setdefault(rel_dir, set())
        stem, n = path.stem, 2
        if stem.lower() in taken:  # a.png next to a.jpg: both become PNGs
            stem = base = f"{path.stem}-{path.suffix.lstrip('.').lower()}"
            while stem.lower() in taken:
                stem, n = f"{base}_{n}", n + 1
        taken.add(stem.lower())
        caption = path.with_suffix(caption_extension)
        items.append(PlanItem(path, rel_dir, stem, caption if caption.is_file() else None))
    return items


def make_plan(o: PreprocessOptions) -> PreprocessPlan:
    """Check everything and list the work; raises :class:`ConfigError` with every problem. Writes nothing."""
    problems = _validate_values(o)
    folder_problems, source, dest = _validate_folders(o)
    problems += folder_problems
    notes: list[str] = []
    before = len(problems)
    images = _source_images(source, notes, problems) if source is not None else []
    if source is not None and not images and len(problems) == before:
        problems.append(Problem("source_dir", f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {source} or its "
                                              "sub-folders"))
    if problems:
        raise ConfigError(problems)
    assert source is not None and dest is not None
    for key in ("width", "height"):
        if getattr(o, key) % 64 and (o.resize in ("crop", "focal") or o.split):
            notes.append(f"{key} {getattr(o, key)} is not a multiple of 64; training resizes such images into "
                         "its buckets again")
    clear = []
    if o.if_dest_exists == "clear" and dest.is_dir():
        clear = _dest_files(dest)
    return PreprocessPlan(o, source, dest, _plan_items(source, images, o.caption_extension), notes, clear)


# ------------------------------------------------------------------------------------------------ running

@dataclass
class Operations:
    """The image work of a run. Each callable gets an RGB image; the WebUI layer builds them from the WebUI's
    code, with the run's options already bound."""

    resize: Callable[[Image.Image], Image.Image]  # crop mode: exactly width×height
    focal: Callable[[Image.Image], list[Image.Image]]  # [crop] or [crop, debug image]
    auto: Callable[[Image.Image], Image.Image | None]  # None: no size within the error threshold
    split: Callable[[Image.Image], list[Image.Image]]  # the pieces (width×height); 0 or 1 = not split
    flip: Callable[[Image.Image], Image.Image]
    captioners: dict[str, Callable[[Image.Image], str]] = field(default_factory=dict)  # name → caption, in order


@dataclass
class Hooks:
    """How a run reports progress and learns that it should stop (the WebUI: ``shared.state``)."""

    on_item: Callable[[int, int, str], None] = lambda index, total, text: None  # before item ``index`` of total
    stop_requested: Callable[[], bool] = lambda: False
    skip_requested: Callable[[], bool] = lambda: False  # skip the current image (checked after its processing)
    on_image: Callable[[Image.Image], None] = lambda image: None  # each written image (a live preview)


@dataclass
class PreprocessResult:
    output_dir: str
    images: list[str] = field(default_factory=list)  # written images, relative to output_dir ("/"-separated)
    captions: list[str] = field(default_factory=list)  # written caption files, the same way
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    processed: int = 0  # source images done
    total: int = 0  # source images planned

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _clear(plan: PreprocessPlan) -> None:
    for path in plan.clear:
        path.unlink(missing_ok=True)
    for dirpath, _, _ in sorted(os.walk(plan.dest), key=lambda e: -len(Path(e[0]).parts)):
        if Path(dirpath) != plan.dest and not any(Path(dirpath).iterdir()):
            Path(dirpath).rmdir()


def _shape(image: Image.Image, plan: PreprocessPlan, ops: Operations, item: PlanItem,
           notes: list[str]) -> tuple[list[Image.Image], list[Image.Image]]:
    """The outputs of one image before flipping, and the debug images."""
    o = plan.options
    if o.split:
        pieces = ops.split(image)
        if len(pieces) > 1:
            return pieces, []
    if o.resize == "crop":
        return [ops.resize(image)], []
    if o.resize == "focal":
        crop, *debug = ops.focal(image)
        return [crop], debug
    if o.resize == "auto":
        cropped = ops.auto(image)
        if cropped is None:
            notes.append(f"{item.rel_path}: kept at {image.width}×{image.height}, no size between "
                         f"{o.auto_min_side} and {o.auto_max_side} px fits its aspect ratio within the error "
                         f"threshold {o.auto_threshold}")
            return [image], []
        return [cropped], []
    return [image], []


def _existing_caption(item: PlanItem, notes: list[str]) -> str:
    if item.caption_file is None:
        return ""
    try:
        return read_caption(item.caption_file)
    except CaptionError as e:
        notes.append(f"{item.rel_dir.as_posix()}/{item.caption_file.name}: {e.detail}; its image was processed "
                     "without it")
        return ""


def _generate(image: Image.Image, ops: Operations) -> str:
    return join_generated(caption(image) for caption in ops.captioners.values())


class _Writer:
    """Writes outputs with unique names per folder; remembers what it wrote."""

    def __init__(self, plan: PreprocessPlan, result: PreprocessResult, hooks: Hooks):
        self.plan, self.result, self.hooks = plan, result, hooks
        self.used: dict[Path, set[str]] = {}
        for item in plan.items:  # the plain stems are reserved for their own images
            self.used.setdefault(item.rel_dir, set()).add(item.stem.lower())

    def name(self, rel_dir: Path, wanted: str, own: bool) -> str:
        taken = self.used.setdefault(rel_dir, set())
        if own:
            return wanted
        name, n = wanted, 2
        while name.lower() in taken:
            name, n = f"{wanted}_{n}", n + 1
        taken.add(name.lower())
        return name

    def image(self, image: Image.Image, rel_path: Path) -> None:
        path = self.plan.dest / rel_path
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
        self.result.images.append(rel_path.as_posix())
        self.hooks.on_image(image)

    def caption(self, image_rel: Path, caption: str) -> None:
        rel = image_rel.with_suffix(self.plan.options.caption_extension)
        if caption:
            atomic_write_text(self.plan.dest / rel, caption + "\n")
            self.result.captions.append(rel.as_posix())
        else:
            (self.plan.dest / rel).unlink(missing_ok=True)  # a stale caption from an earlier run (overwrite)


def _process_item(item: PlanItem, image: Image.Image, plan: PreprocessPlan, ops: Operations, writer: _Writer,
                  notes: list[str]) -> list[tuple[Path, Image.Image, str]]:
    """Shape, caption and flip one image; returns what to write (paths relative to the destination)."""
    o = plan.options
    shaped, debug = _shape(image, plan, ops, item, notes)
    existing = _existing_caption(item, notes)
    out: list[tuple[Path, Image.Image, str]] = []
    for k, piece in enumerate(shaped):
        own = k == 0
        stem = writer.name(item.rel_dir, item.stem if own else f"{item.stem}-{k + 1}", own)
        needs_generated = ops.captioners and not (o.existing_caption == "ignore" and existing)
        caption = merge_caption(existing, _generate(piece, ops) if needs_generated else "", o.existing_caption)
        out.append((item.rel_dir / f"{stem}{OUTPUT_EXTENSION}", piece, caption))
        if o.flip:
            flipped = writer.name(item.rel_dir, f"{stem}-flipped", False)
            out.append((item.rel_dir / f"{flipped}{OUTPUT_EXTENSION}", ops.flip(piece), caption))
    for k, extra in enumerate(debug):
        suffix = "" if k == 0 else f"-{k + 1}"
        out.append((Path(DEBUG_FOLDER) / item.rel_dir / f"{item.stem}{suffix}{OUTPUT_EXTENSION}", extra, ""))
    return out


def run_plan(plan: PreprocessPlan, ops: Operations, hooks: Hooks | None = None) -> PreprocessResult:
    """Process every planned image into the destination. Unreadable images are left out with a note; a stop
    request ends the run after the current image (what was written stays)."""
    hooks = hooks or Hooks()
    # the plan's notes list itself: operations may add notes while they run (e.g. a model fallback)
    result = PreprocessResult(str(plan.dest), notes=plan.notes, total=len(plan.items))
    if plan.clear:
        _clear(plan)
    plan.dest.mkdir(parents=True, exist_ok=True)
    writer, left_out = _Writer(plan, result, hooks), []
    for index, item in enumerate(plan.items):
        if hooks.stop_requested():
            result.interrupted = True
            result.notes.append(f"Interrupted after {index} of {len(plan.items)} images; the rest was not "
                                "processed.")
            break
        hooks.on_item(index, len(plan.items), item.rel_path)
        try:
            image = open_training_image(item.source)
        except ImageError as e:
            left_out.append(f"{item.rel_path}: {e.detail}")
            continue
        outputs = _process_item(item, image, plan, ops, writer, result.notes)
        if hooks.skip_requested():
            result.notes.append(f"{item.rel_path}: skipped on request")
            continue
        for rel, out_image, caption in outputs:
            writer.image(out_image, rel)
            if rel.parts[0] != DEBUG_FOLDER:
                writer.caption(rel, caption)
        result.processed += 1
    if left_out:
        result.notes.append(f"{len(left_out)} image(s) could not be read and were left out: " + "; ".join(left_out))
    if not result.interrupted:
        hooks.on_item(len(plan.items), len(plan.items), "done")
    return result


# ------------------------------------------------------------------------------------------------ uploads

@dataclass
class UploadResult:
    run_dir: Path  # the dataset root to preprocess or train (``<root>/<run>``)
    folder: Path  # the repeat folder the files went to (``<root>/<run>/<N>_<concept>``)
    stored: list[Path] = field(default_factory=list)
    rejected: list[Problem] = field(default_factory=list)
    replaced: int = 0  # files that replaced one of the same name

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "folder": str(self.folder), "stored": [str(p) for p in self.stored],
                "rejected": [{"file": p.where, "message": p.message} for p in self.rejected],
                "replaced": self.replaced}


def upload_source(upload: Any) -> tuple[Path, str]:
    """(file on disk, the name the user gave it) of an uploaded file: a ``(path, name)`` pair, a path (gradio 4),
    or a gradio 3 temp-file object (``.name`` = path on the server, ``.orig_name`` = where it came from; both are
    server paths, so only their last part is the user's file name)."""
    if isinstance(upload, (tuple, list)) and len(upload) == 2:
        return Path(upload[0]), str(upload[1])
    if isinstance(upload, (str, os.PathLike)):
        return Path(upload), Path(upload).name
    path = getattr(upload, "name", None)
    if not isinstance(path, str):
        raise TrainerError(f"an uploaded file came as {type(upload).__name__}, not a file; upload it again")
    return Path(path), Path(getattr(upload, "orig_name", None) or path).name


_BAD_NAME = re.compile(r"[/\\:*?\"<>|\x00-\x1f]")


def _name_problem(name: str) -> str | None:
    if not name or name in (".", ".."):
        return "has no file name"
    if _BAD_NAME.search(name):
        return "has a path or a character file names cannot hold (/ \\ : * ? \" < > |); upload the file itself"
    if name.startswith("."):
        return "is a hidden file (name starting with '.'), which the dataset scan skips; rename it"
    return None


def repeat_folder_name(repeats: int, concept: str) -> str:
    return f"{repeats}_{concept}"


def store_uploads(files: Iterable[Any], root: str | os.PathLike, run: str, *, repeats: int = 1, concept: str = "",
                  caption_extension: str = ".txt") -> UploadResult:
    """Copy uploaded images (and caption files) into ``<root>/<run>/<repeats>_<concept>/`` (``concept`` defaults
    to the run name). Files already there with the same name are replaced. Each file that is not a readable image
    or a caption, or whose name is not a plain file name, is refused and listed; raises :class:`ConfigError` for a
    bad run/concept/repeat value and :class:`DatasetError` when no image could be stored."""
    run, concept = run.strip(), (concept.strip() or run.strip())
    problems = [Problem(key, msg) for key, msg in (("run", check_output_name(run, "run name")),
                                                    ("concept", check_output_name(concept, "concept name")))
                if msg]
    if not isinstance(repeats, int) or isinstance(repeats, bool) or not 1 <= repeats <= 10000:
        problems.append(Problem("repeats", f"{repeats!r} is not a whole number from 1 to 10000"))
    if problems:
        raise ConfigError(problems)
    run_dir = Path(root).expanduser() / run
    folder = run_dir / repeat_folder_name(repeats, concept)
    result = UploadResult(run_dir, folder)
    accepted: list[tuple[Path, str]] = []
    for upload in files or []:
        path, name = upload_source(upload)
        why = _name_problem(name)
        if why is None:
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                probed = probe_image(path)
                why = probed.message if isinstance(probed, Problem) else None
            elif suffix == caption_extension.lower():
                try:
                    read_caption(path)
                except CaptionError as e:
                    why = e.detail
            else:
                why = (f"is not an image ({', '.join(IMAGE_EXTENSIONS)}) or a caption file ({caption_extension}); "
                       "only those are stored")
        if why:
            result.rejected.append(Problem(name, why))
        else:
            accepted.append((path, name))
    if not any(Path(name).suffix.lower() in IMAGE_EXTENSIONS for _, name in accepted):
        raise DatasetError(result.rejected + [Problem(str(folder), "no image was stored; upload .png/.jpg/.webp "
                                                                   "images (captions as .txt next to them)")])
    for path, name in accepted:
        target = folder / name
        if target.exists():
            result.replaced += 1
        atomic_write(target, lambda tmp, src=path: shutil.copyfile(src, tmp))
        result.stored.append(target)
    return result
