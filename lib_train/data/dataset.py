"""Dataset scan: find the images, their captions and repeat counts, and every problem, before anything trains.

Folder rules (kohya's DreamBooth layout, PEERS.md §4.1):

* A folder named ``N_name`` (N a positive integer, name non-empty) repeats each of its images N times per epoch;
  ``name`` is the concept name. Such folders are found at any depth below the selected folder; an image belongs to
  the nearest ``N_name`` folder above it (so ``10_char/closeups/a.png`` repeats 10 times). The selected folder's
  own name never counts. kohya only looks one level deep and skips images outside ``N_name`` folders; we use
  ``default_repeats`` for those and warn.
* ``0_name`` and ``-3_name`` are errors (the images could never be used); ``10x``, ``10_``, ``_x`` get a warning
  explaining the convention and are treated as plain folders.
* Hidden files and folders (name starting with ".") are skipped.
* The caption of ``a.png`` is ``a<caption_extension>`` next to it, read as UTF-8 (with or without BOM) or UTF-16 with
  BOM; anything else is a problem naming the file. Lines are stripped and the non-empty ones joined with ``", "``
  (kohya reads only the first line; joining keeps a multi-line caption whole). No caption file -> the folder's
  concept name is the caption, as in kohya (``10_sks dog/a.png`` trains on "sks dog"), or "" outside an ``N_name``
  folder; either way with a warning.
* Regularization images (``reg_dir``, same folder rules) are cycled like kohya (train_util.py, DreamBoothDataset):
  every reg image first gets its folder's repeats, then one more sample each, in order, until the reg samples reach
  the train samples; reg images past that point are unused (``samples_per_epoch == 0``).

Problems (fatal; the image is left out of ``items``) and warnings are collected, never raised one by one.
No torch here: the WebUI tab runs this scan to show the dataset.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import DatasetError, Problem, TrainerError
from .captions import split_tags
from .images import IMAGE_EXTENSIONS, is_image_file, probe_image

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
_NOT_POSITIVE = re.compile(r"^(-\d+|0+)_")
_NO_UNDERSCORE = re.compile(r"^\d+(?=[^\d_])")
_UNSUPPORTED_IMAGES = {".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".psd", ".svg", ".ico"}
_EXAMPLES = 5  # file names listed in a warning about many files
_CONVENTION = ("name the folder N_name, e.g. '10_mychar' (10 = how often each image is used per epoch, "
               "mychar = concept name)")


@dataclass(frozen=True)
class ImageItem:
    """One usable image. ``width``/``height`` are the EXIF-oriented pixel size training sees."""

    path: Path
    caption: str
    repeats: int  # N of the N_name folder (default_repeats outside one)
    subset_dir: Path  # the N_name folder the repeats come from (the root folder outside one)
    is_reg: bool
    width: int
    height: int
    samples_per_epoch: int  # = repeats for train images; for reg images after the reg rule (0 = unused)
    has_caption_file: bool = True


@dataclass(frozen=True)
class Subset:
    """One repeat folder: ``key`` is its name in ``ss_dataset_dirs`` / ``ss_tag_frequency``."""

    dir: Path
    key: str  # path relative to the scanned root, "/"-separated (kohya: the basename); the root's own name for it
    repeats: int
    concept: str  # the part after "N_" ("" outside an N_name folder)
    is_reg: bool
    img_count: int


class CaptionError(TrainerError):
    """A caption file that cannot be read; ``detail`` says why and what to do."""

    def __init__(self, path: Path, detail: str):
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}")


def read_caption(path: str | os.PathLike) -> str:
    """Read a caption file: UTF-8 (BOM optional) or UTF-16 with BOM; non-empty stripped lines joined by ", "."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CaptionError(path, f"cannot be read ({e.strerror or e}); check the file's permissions") from e
    return decode_caption(data, path)


def decode_caption(data: bytes, path: Path) -> str:
    """The caption text of a caption file's bytes (the rules of :func:`read_caption`); ``path`` for the message."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise CaptionError(path, "starts like UTF-16 text but is damaged; open it in a text editor and "
                                     "save it as UTF-8") from e
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise CaptionError(path, f"is not UTF-8 text (byte 0x{data[e.start]:02x} at position {e.start}); "
                                     "open it in a text editor and save it as UTF-8") from e
    if "\x00" in text:
        raise CaptionError(path, "contains NUL characters (probably UTF-16 without a byte-order mark); "
                                 "open it in a text editor and save it as UTF-8")
    return ", ".join(line.strip() for line in text.splitlines() if line.strip())


@dataclass
class DatasetScan:
    """Result of :func:`scan_dataset`. Counts follow kohya's metadata meanings (FORMATS.md §B.1)."""

    train_dir: Path
    reg_dir: Path | None
    items: list[ImageItem] = field(default_factory=list)
    folders: list[Subset] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # fatal: training must not start
    warnings: list[Problem] = field(default_factory=list)

    @property
    def train_items(self) -> list[ImageItem]:
        return [it for it in self.items if not it.is_reg]

    @property
    def reg_items(self) -> list[ImageItem]:
        return [it for it in self.items if it.is_reg]

    @property
    def num_train_images(self) -> int:
        """Train images × their repeats (kohya's ``ss_num_train_images``, "train images with repeating")."""
        return sum(it.repeats for it in self.train_items)

    @property
    def num_reg_images(self) -> int:
        """Reg images × their folder repeats, before the reg rule (kohya's ``ss_num_reg_images``)."""
        return sum(it.repeats for it in self.reg_items)

    @property
    def num_reg_samples(self) -> int:
        """Reg samples per epoch after the reg rule (= num_train_images, or a little more; 0 without reg)."""
        return sum(it.samples_per_epoch for it in self.reg_items)

    @property
    def samples_per_epoch(self) -> int:
        return sum(it.samples_per_epoch for it in self.items)

    def _dirs(self, is_reg: bool) -> dict[str, dict[str, int]]:
        return {s.key: {"n_repeats": s.repeats, "img_count": s.img_count} for s in self.folders if s.is_reg == is_reg}

    @property
    def subsets(self) -> dict[str, dict[str, int]]:
        """``ss_dataset_dirs``: ``{"<dir>": {"n_repeats": int, "img_count": int}}`` for the train folders."""
        return self._dirs(False)

    @property
    def reg_subsets(self) -> dict[str, dict[str, int]]:
        """``ss_reg_dataset_dirs``, same shape, for the regularization folders."""
        return self._dirs(True)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """``ss_tag_frequency``: ``{"<dir>": {"<tag>": count}}``; tags = caption split on ",", stripped,
        lower-cased, counted once per image (not per repeat), train and reg folders alike (train_util.py:800-809)."""
        key_of = {s.dir: s.key for s in self.folders}
        out: dict[str, dict[str, int]] = {}
        for it in self.items:
            counts = out.setdefault(key_of[it.subset_dir], {})
            for tag in split_tags(it.caption):
                counts[tag.lower()] = counts.get(tag.lower(), 0) + 1
        return out

    def raise_if_problems(self) -> None:
        """Raise DatasetError listing every problem, if any."""
        if self.problems:
            raise DatasetError(self.problems)


@dataclass
class _Root:
    """Scan state of one root folder (train or reg)."""

    root: Path
    is_reg: bool
    items: list[ImageItem] = field(default_factory=list)
    folders: list[Subset] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)
    unsupported: list[Path] = field(default_factory=list)
    image_dirs: list[Path] = field(default_factory=list)  # folders holding image files, usable or not
    caption_files: int = 0


def _check_root(path: Path | None, what: str, problems: list[Problem]) -> bool:
    if path is None:
        return False
    if not path.exists():
        problems.append(Problem(str(path), f"the {what} does not exist; check the path"))
        return False
    if not path.is_dir():
        problems.append(Problem(str(path), f"the {what} is a file, not a folder; give the folder that holds the "
                                           "images (or their N_name folders)"))
        return False
    where = system_folder(path)
    if where:
        problems.append(Problem(str(path), f"the {what} is {where}, not a dataset; give the folder that holds the "
                                           "images (or their N_name folders)"))
        return False
    return True


_SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")  # kernel views, not files: never walked


def system_folder(path: str | os.PathLike) -> str | None:
    """What ``path`` is when no image folder can be it — "the root of a file system", "the system folder /proc"
    (links resolved) — else None. Such a folder is refused before it is walked."""
    real = Path(os.path.realpath(path))
    system = next((s for s in _SYSTEM_FOLDERS if real == Path(s) or Path(s) in real.parents), None)
    if system:
        return f"the system folder {system}"
    return "the root of a file system" if real == Path(real.anchor) else None


@dataclass(frozen=True)
class ScanLimits:
    """Where a scan gives up: a training set has hundreds or thousands of images, so a folder past these is the
    wrong one (a drive, a home folder, ``/``), and walking it whole would take minutes. The scan stops there and
    says so (a problem: nothing trains on a partial scan)."""

    max_entries: int = 100_000  # files and folders looked at while walking (captions and other files included)
    max_images: int = 50_000  # image files found
    max_seconds: float = 20.0  # time spent walking the folders (decoding the images found is not counted)


SCAN_LIMITS = ScanLimits()
_confinement: ContextVar[tuple[str, ...] | None] = ContextVar("dataset_confinement", default=None)


@contextmanager
def confined_to(roots: Sequence[str | os.PathLike] | None) -> Iterator[None]:
    """Scans in this block read only files and folders whose real path (links resolved) is inside ``roots``: a
    link in the dataset that leads out of them is reported, never followed (a shared WebUI's
    ``--hide-ui-dir-config``: the same containment rule as the dataset folder itself). None: no limit."""
    token = _confinement.set(None if roots is None else tuple(os.path.realpath(os.path.expanduser(r))
                                                              for r in roots))
    try:
        yield
    finally:
        _confinement.reset(token)


def _inside(real: str, roots: tuple[str, ...]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


@dataclass
class ScanBudget:
    """What is left of :class:`ScanLimits` for one scan (both roots together; a preprocessing listing too)."""

    limits: ScanLimits
    started: float = field(default_factory=time.monotonic)
    entries: int = 0
    images: int = 0
    stopped: str = ""  # why the scan stopped early ("" = it did not)

    def spend(self, entries: int, images: int) -> bool:
        """Count a folder's entries; False (and ``stopped`` set) once a limit is passed."""
        self.entries += entries
        self.images += images
        lim = self.limits
        if self.images > lim.max_images:
            self.stopped = f"more than {lim.max_images} images"
        elif self.entries > lim.max_entries:
            self.stopped = f"more than {lim.max_entries} files and folders"
        elif time.monotonic() - self.started > lim.max_seconds:
            self.stopped = f"{lim.max_seconds:g} seconds of walking its folders ({self.entries} files and folders)"
        return not self.stopped


def _walk(root: Path, budget: ScanBudget | None = None, outside: list[Path] | None = None
          ) -> list[tuple[Path, list[str]]]:
    """Every non-hidden folder under ``root`` (root included) with its sorted non-hidden file names; stops when
    ``budget`` runs out. Under :func:`confined_to`, links (folders or files) whose target is outside the allowed
    roots are left out and added to ``outside``."""
    out, seen = [], set()
    roots = _confinement.get()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        if roots is not None and not _inside(real, roots):
            dirnames[:] = []
            if outside is not None:
                outside.append(Path(dirpath))
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files = sorted(f for f in filenames if not f.startswith("."))
        if roots is not None:
            inside = {f: _inside(os.path.realpath(os.path.join(dirpath, f)), roots) for f in files}
            if outside is not None:
                outside += [Path(dirpath) / f for f in files if not inside[f]]
            files = [f for f in files if inside[f]]
        out.append((Path(dirpath), files))
        if budget is not None and not budget.spend(len(dirnames) + len(files), sum(map(is_image_file, files))):
            break
    return sorted(out, key=lambda e: e[0].parts)


def _check_folder_name(folder: Path, problems: list[Problem], warnings: list[Problem]) -> None:
    name = folder.name
    if _NOT_POSITIVE.match(name):
        count, concept = name.split("_", 1)
        problems.append(Problem(str(folder), f"the folder name '{name}' asks for {count} repeats, so its images "
                                             f"would never be used; rename it with 1 or more repeats, e.g. "
                                             f"'1_{concept or 'name'}'"))
    elif re.match(r"^\d+_$", name):
        warnings.append(Problem(str(folder), f"the folder name '{name}' has no concept name after the number, so it "
                                             f"is treated as a plain folder; {_CONVENTION}"))
    elif _NO_UNDERSCORE.match(name) or name.startswith("_"):
        warnings.append(Problem(str(folder), f"the folder name '{name}' looks like a repeat folder but is not one "
                                             f"(missing number or '_'), so it is treated as a plain folder; "
                                             f"{_CONVENTION}"))


def _subset_of(folder: Path, root: Path) -> tuple[Path, int, str] | None:
    """Nearest ``N_name`` folder at or above ``folder``, below ``root``: (dir, N, name); None if there is none.
    ``0_name`` and ``-3_name`` are returned with N = 0 (the caller skips them; the name check reports them).
    The root's own name never counts (as in kohya): ``2024_photos`` chosen as the root is not 2024 repeats."""
    candidate = folder
    while candidate != root and root in candidate.parents:
        if _NOT_POSITIVE.match(candidate.name):
            return candidate, 0, ""
        m = _REPEAT_FOLDER.match(candidate.name)
        if m:
            return candidate, int(m.group(1)), m.group(2)
        candidate = candidate.parent
    return None


def _examples(paths: list[Path], root: Path) -> str:
    names = [p.relative_to(root).as_posix() for p in paths[:_EXAMPLES]]
    return ", ".join(names) + (", …" if len(paths) > _EXAMPLES else "")


def _scan_root(state: _Root, *, caption_extension: str, default_repeats: int, min_side: int,
               problems: list[Problem], warnings: list[Problem], budget: ScanBudget | None = None) -> None:
    root = state.root
    by_subset: dict[Path, list[ImageItem]] = {}
    subset_info: dict[Path, tuple[int, str]] = {}
    plain_folders: list[Path] = []
    repeat_folders: list[Path] = []
    outside: list[Path] = []
    walked = _walk(root, budget, outside)
    if outside:
        problems.append(Problem(str(root), f"{len(outside)} link(s) lead out of the folders this WebUI allows and are "
                                           f"not read ({_examples(outside, root)}); copy the files into the dataset "
                                           "folder instead of linking them"))
    if budget is not None and budget.stopped:
        problems.append(Problem(str(root), f"the scan stopped after {budget.stopped}: this is not a training "
                                           "folder (a drive, a home folder?); choose the folder that holds the "
                                           "N_name folders of your images"))
        return
    for folder, files in walked:
        if folder != root:
            _check_folder_name(folder, problems, warnings)
            m = _REPEAT_FOLDER.match(folder.name)
            if m and int(m.group(1)) > 0:
                repeat_folders.append(folder)
        images = [folder / f for f in files if is_image_file(f)]
        state.caption_files += sum(f.lower().endswith(caption_extension.lower()) for f in files)
        state.unsupported += [folder / f for f in files if Path(f).suffix.lower() in _UNSUPPORTED_IMAGES]
        if not images:
            continue
        state.image_dirs.append(folder)
        found = _subset_of(folder, root)
        if found is not None and found[1] == 0:
            continue  # reported by _check_folder_name; these images can never be used
        subset_dir, repeats, concept = found if found is not None else (root, default_repeats, "")
        if found is None:
            plain_folders.append(folder)
        subset_info[subset_dir] = (repeats, concept)
        for image in images:
            item = _scan_image(image, subset_dir, repeats, concept, state, caption_extension=caption_extension,
                               min_side=min_side, problems=problems)
            if item is not None:
                by_subset.setdefault(subset_dir, []).append(item)
    for subset_dir in sorted(by_subset, key=lambda p: p.parts):
        repeats, concept = subset_info[subset_dir]
        key = root.name if subset_dir == root else subset_dir.relative_to(root).as_posix()
        state.folders.append(Subset(subset_dir, key, repeats, concept, state.is_reg, len(by_subset[subset_dir])))
        state.items += by_subset[subset_dir]
    for folder in repeat_folders:
        if not any(d == folder or folder in d.parents for d in state.image_dirs):
            warnings.append(Problem(str(folder), "this repeat folder holds no images and is skipped; put the images "
                                                 "in it, or delete it"))
    _summarise(state, plain_folders, caption_extension, default_repeats, problems, warnings)


def _scan_image(image: Path, subset_dir: Path, repeats: int, concept: str, state: _Root, *,
                caption_extension: str, min_side: int, problems: list[Problem]) -> ImageItem | None:
    size = probe_image(image)
    if isinstance(size, Problem):
        problems.append(size)
        return None
    width, height = size
    if width <= 1 and height <= 1:
        problems.append(Problem(str(image), f"the image is {width}×{height} pixel (a placeholder or a failed "
                                            "export); replace it with the real image or delete it"))
        return None
    if min(width, height) < min_side:
        problems.append(Problem(str(image), f"the image is {width}×{height} pixels; its shorter side is below the "
                                            f"minimum of {min_side} px. Use a larger version or delete it"))
        return None
    caption_path = image.with_name(image.stem + caption_extension)
    caption, has_caption = concept, caption_path.is_file()
    if has_caption:
        try:
            caption = read_caption(caption_path)
        except CaptionError as e:
            problems.append(Problem(str(e.path), e.detail))
            return None
    else:
        state.missing_captions.append(image)
    return ImageItem(image, caption, repeats, subset_dir, state.is_reg, width, height, repeats, has_caption)


def _summarise(state: _Root, plain_folders: list[Path], caption_extension: str, default_repeats: int,
               problems: list[Problem], warnings: list[Problem]) -> None:
    root, what = state.root, ("regularization folder" if state.is_reg else "training folder")
    if not state.items and not state.image_dirs:  # otherwise every image there was reported as unusable already
        if state.unsupported:
            problems.append(Problem(str(root), f"the {what} contains no images that can be read "
                                               f"({' '.join(IMAGE_EXTENSIONS)}), only {_unsupported(state, root)}"))
            return
        hint = (f"; it has {state.caption_files} caption file(s) ({caption_extension}) but no images: put the "
                "images next to their captions" if state.caption_files else "")
        problems.append(Problem(str(root), f"the {what} contains no images ({' '.join(IMAGE_EXTENSIONS)})"
                                           f"{hint}; {_CONVENTION} inside it and put the images there"))
        return
    if state.unsupported:
        warnings.append(Problem(str(root), f"{_unsupported(state, root)}; until then they are ignored"))
    if not state.items:
        return
    if plain_folders:
        names = ", ".join("the folder itself" if p == root else f"'{p.relative_to(root).as_posix()}'"
                          for p in plain_folders[:_EXAMPLES])
        n = sum(1 for it in state.items if it.subset_dir == root)
        hint = (f" ('{root.name}' is the folder you selected, so its name does not count: select its parent "
                "folder to use it as a repeat folder)" if _REPEAT_FOLDER.match(root.name) else "")
        warnings.append(Problem(str(root), f"{n} image(s) are not inside a repeat folder (in {names}) and use the "
                                           f"default of {default_repeats} repeat(s) per epoch; to choose repeats "
                                           f"per folder, {_CONVENTION}{hint}"))
    if state.missing_captions:
        warnings.append(Problem(str(root), f"{len(state.missing_captions)} image(s) have no caption file "
                                           f"({_examples(state.missing_captions, root)}); they train with their "
                                           "folder's concept name as caption ('10_sks dog' -> 'sks dog'), or an "
                                           f"empty caption outside N_name folders. Add '<image name>"
                                           f"{caption_extension}' next to each image if that is not intended"))


def _unsupported(state: _Root, root: Path) -> str:
    """The files of formats the scan does not read, named, with how to convert them."""
    kinds = sorted({p.suffix.lower() for p in state.unsupported})
    gif = (" (an animated GIF: export the frames you want as separate images)" if ".gif" in kinds else "")
    return (f"{len(state.unsupported)} file(s) in a format that is not read ({' '.join(kinds)}: "
            f"{_examples(state.unsupported, root)}); convert them to PNG or JPEG{gif} with any image editor or "
            "ImageMagick (`mogrify -format png *.gif`)")


def _apply_reg_rule(train: list[ImageItem], reg: list[ImageItem]) -> list[ImageItem]:
    """Cycle the reg images until reg samples >= train samples (kohya DreamBoothDataset): the first pass gives
    each reg image its folder repeats, later passes one sample each; images after the stopping point get 0."""
    target = sum(it.repeats for it in train)
    samples = [0] * len(reg)
    n, first_pass = 0, True
    while reg and n < target:
        for i, it in enumerate(reg):
            step = it.repeats if first_pass else 1
            samples[i] += step
            n += step
            if n >= target:
                break
        first_pass = False
    return [replace(it, samples_per_epoch=s) for it, s in zip(reg, samples)]


def scan_dataset(
    train_dir: str | os.PathLike,
    *,
    reg_dir: str | os.PathLike | None = None,
    caption_extension: str = ".txt",
    default_repeats: int = 1,
    min_side: int = 64,
    limits: ScanLimits = SCAN_LIMITS,
) -> DatasetScan:
    """Scan ``train_dir`` (and ``reg_dir``) and return every usable image plus all problems and warnings.

    ``min_side`` is the smallest usable image side in pixels. Every image is fully decoded once (a few ms each).
    A folder past ``limits`` is not scanned further (a problem says so); inside :func:`confined_to`, links out of
    the allowed folders are reported and not followed.
    """
    budget = ScanBudget(limits)
    train = Path(train_dir).expanduser()
    reg = Path(reg_dir).expanduser() if reg_dir not in (None, "") else None
    scan = DatasetScan(train, reg)
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    if ext.lower() in IMAGE_EXTENSIONS or ext == ".":
        scan.problems.append(Problem("caption_extension", f"'{caption_extension}' cannot be a caption extension; "
                                                          "use '.txt' or '.caption'"))
    if default_repeats < 1:
        scan.problems.append(Problem("default_repeats", f"is {default_repeats}; it must be 1 or more"))
    if scan.problems:
        return scan
    roots = []
    if _check_root(train, "training folder", scan.problems):
        roots.append(_Root(train, is_reg=False))
    if _check_root(reg, "regularization folder", scan.problems):
        rt, rr = train.resolve(), reg.resolve()
        if rt == rr or rt in rr.parents or rr in rt.parents:
            scan.problems.append(Problem(str(reg), f"the regularization folder and the training folder {train} "
                                                   "overlap; keep them in two separate folders"))
        else:
            roots.append(_Root(reg, is_reg=True))
    for state in roots:
        _scan_root(state, caption_extension=ext, default_repeats=default_repeats, min_side=min_side,
                   problems=scan.problems, warnings=scan.warnings, budget=budget)
        if budget.stopped:
            break
        scan.folders += state.folders
        scan.items += state.items
    train_items = [it for it in scan.items if not it.is_reg]
    reg_items = _apply_reg_rule(train_items, [it for it in scan.items if it.is_reg])
    scan.items = train_items + reg_items
    unused = sum(1 for it in reg_items if it.samples_per_epoch == 0)
    if unused and train_items:
        scan.warnings.append(Problem(str(reg), f"{unused} of {len(reg_items)} regularization images are not used: "
                                               f"reg samples are capped at the {scan.num_train_images} train samples "
                                               "per epoch (images × repeats); lower the reg folder repeats or remove "
                                               "images if you expected all to be used"))
    return scan
