"""Captions in bulk: load every caption of a dataset, count its tags, and edit them all at once with Preview, Apply
and Undo (the tab's "Captions" panel and ``/trainer/v1/captions/*`` use these functions; no torch, no WebUI).

Which captions: the images the dataset scan finds (:mod:`.dataset`'s folder rules: ``N_name`` repeat folders at
any depth, hidden files and folders skipped, ``0_name`` folders left out, links out of the allowed folders not
followed under :func:`.dataset.confined_to`), train and regularization folders, and for each image its caption file
``<image stem><caption extension>``. Images are not opened. Folders are named as in ``ss_tag_frequency`` (the
``N_name`` folder's path below the selected folder); regularization folders get ``reg: `` in front.

Encodings: a caption is read with the scan's rules (:func:`.dataset.decode_caption`: UTF-8 with or without BOM,
UTF-16 with BOM; its lines joined with ", "). A caption in another encoding is a problem, as in the scan, unless
``legacy_encoding`` is set: then it is read as Windows-1252 (Western European; every Latin-1 file reads the same).
Whatever a caption was stored as, a caption the plan changes is written back as UTF-8, on one line; the preview
says how many of the changed captions that converts.

Tags: a caption split on commas, each tag's whitespace collapsed to single spaces. Tags are compared and counted
ignoring case (as ``ss_tag_frequency``, and as the CLIP tokenizer, which lower-cases all text); the table counts
images (a tag twice in a caption counts once).

Actions (:class:`CaptionPlan`), each a pure function caption → caption, composed in this order: replace (a whole
tag, a plain text, or a regular expression on the caption text), remove tags, add tags where missing, deduplicate,
sort by frequency keeping the first N in place, put the trigger word(s) first (added where missing). An action
that leaves a caption's tags as they were returns it untouched (spacing included), so only real changes count.
Images without a caption file are left alone unless ``include_uncaptioned``: then they start from an empty caption
and get a file when the actions give them tags (the trigger word, an added tag).

Apply writes each changed caption atomically (:func:`lib_train.atomic.atomic_write_bytes`) after keeping the
previous bytes in a backup set: ``<train folder>/.caption-backups/<time>/`` (a hidden folder, so scans and
preprocessing skip it; it travels with the dataset), with ``manifest.json`` listing every written file, whether it
existed before, and a hash of what was written. Undo restores the newest set exactly (the original bytes and
encoding; files the apply created are deleted) and then removes the set, so a second Undo goes back one more
apply. Undo refuses, changing nothing, when any of those captions changed or vanished since the apply (it names
them; the backup stays for copying by hand).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes, atomic_write_text, is_within
from ..errors import ConfigError, DatasetError, Problem, TrainerError
from ..settings import MAX_TEXT, quote
from .captions import join_tags, split_tags
from .dataset import CaptionError, ScanBudget, SCAN_LIMITS, _check_root, _subset_of, _walk, decode_caption
from .images import is_image_file

BACKUP_DIR = ".caption-backups"
MANIFEST = "manifest.json"
ALL = ""  # the folder scope "all folders"
REG_PREFIX = "reg: "
LEGACY_ENCODING = "cp1252"
MODES = ("tag", "text", "regex")
EXAMPLES = 5  # before/after pairs in a preview
MAX_KEEP_FIRST = 1000
_NAMED = 5  # files named in one message


class CaptionEditError(TrainerError):
    """A caption edit that cannot be done (a file that cannot be written, an Undo that would lose changes)."""


# ------------------------------------------------------------------------------------------------ tags
def norm_tag(tag: str) -> str:
    """A tag with its whitespace collapsed: ``"  red \\t hair "`` → ``"red hair"``."""
    return " ".join(tag.split())


def tag_key(tag: str) -> str:
    """What tags are compared and counted by: whitespace collapsed, lower case."""
    return norm_tag(tag).lower()


def tags_of(caption: str) -> list[str]:
    """The caption's tags, whitespace-normalised, empty ones dropped."""
    return [norm_tag(t) for t in split_tags(caption)]


def parse_tag_list(text: str | Sequence[str]) -> list[str]:
    """A comma-separated text (or a list of texts) → the tags in it, normalised, without repeats."""
    parts = [text] if isinstance(text, str) else list(text)
    out: dict[str, str] = {}
    for part in parts:
        for t in tags_of(part):
            out.setdefault(tag_key(t), t)
    return list(out.values())


def _rewritten(caption: str, tags: list[str]) -> str:
    """``tags`` joined, or ``caption`` itself when its tags are those already (spacing and all kept)."""
    return caption if tags == tags_of(caption) else join_tags(tags)


# ------------------------------------------------------------------------------------------------ the actions
def put_first(caption: str, triggers: Sequence[str]) -> str:
    """The trigger words first, in their given order and spelling; added where missing, their other places
    removed."""
    keys = {tag_key(t) for t in triggers}
    return _rewritten(caption, [norm_tag(t) for t in triggers] + [t for t in tags_of(caption) if tag_key(t) not in keys])


def remove_tags(caption: str, tags: Sequence[str]) -> str:
    keys = {tag_key(t) for t in tags}
    return _rewritten(caption, [t for t in tags_of(caption) if tag_key(t) not in keys])


def replace_tag(caption: str, old: str, new: str) -> str:
    """Every tag equal to ``old`` becomes the tags of ``new`` (``""``: removed; ``"a, b"``: two tags)."""
    key, new_tags = tag_key(old), tags_of(new)
    out: list[str] = []
    for t in tags_of(caption):
        out += new_tags if tag_key(t) == key else [t]
    return _rewritten(caption, out)


def replace_text(caption: str, old: str, new: str) -> str:
    """Plain text replaced anywhere in the caption (case-sensitive), then the tags re-normalised."""
    changed = caption.replace(old, new) if old else caption
    return caption if changed == caption else _rewritten(caption, tags_of(changed))


def replace_regex(caption: str, pattern: re.Pattern[str], new: str) -> str:
    """``pattern.sub(new, caption)`` on the whole caption text (``\\1`` / ``\\g<name>`` groups in ``new``), then the
    tags re-normalised. A bad group reference in ``new`` is a :class:`ConfigError` on ``replace_with``."""
    try:
        changed = pattern.sub(new, caption)
    except (re.error, IndexError) as e:
        raise ConfigError([Problem("replace_with", f"{quote(new)} is not a valid replacement for the regular "
                                                   f"expression ({e}); refer to groups as \\1 or \\g<name>")]) from None
    return caption if changed == caption else _rewritten(caption, tags_of(changed))


def add_tags(caption: str, tags: Sequence[str]) -> str:
    """Each of ``tags`` appended where the caption lacks it."""
    have = {tag_key(t) for t in tags_of(caption)}
    return _rewritten(caption, tags_of(caption) + [norm_tag(t) for t in tags if tag_key(t) not in have])


def dedupe_tags(caption: str) -> str:
    """Repeated tags (compared ignoring case and spacing) removed; the first of each kept."""
    seen: set[str] = set()
    out = []
    for t in tags_of(caption):
        if tag_key(t) not in seen:
            seen.add(tag_key(t))
            out.append(t)
    return _rewritten(caption, out)


def sort_by_frequency(caption: str, frequency: Mapping[str, int], keep_first: int = 0) -> str:
    """The tags after the first ``keep_first`` sorted by ``frequency`` (tag key → images), most frequent first;
    equal counts keep their order."""
    tags = tags_of(caption)
    head, rest = tags[:keep_first], tags[keep_first:]
    return _rewritten(caption, head + sorted(rest, key=lambda t: -frequency.get(tag_key(t), 0)))


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class CaptionPlan:
    """What to do to the captions of ``folder`` (``""`` = all folders)."""

    trigger: str = ""  # comma-separated trigger word(s), put first
    remove: str = ""  # comma-separated tags to remove
    find: str = ""  # replace: what (a tag, a text or a regular expression, by ``mode``)
    replace_with: str = ""  # replace: with what ("" removes)
    mode: str = "tag"  # tag | text | regex
    add: str = ""  # comma-separated tags added where missing
    dedupe: bool = False
    sort: bool = False  # sort by frequency (the tags after the first ``keep_first``)
    keep_first: int = 0
    folder: str = ALL
    include_uncaptioned: bool = False  # give images without a caption file one (when the actions give it tags)

    @property
    def empty(self) -> bool:
        return not (parse_tag_list(self.trigger) or parse_tag_list(self.remove) or self.find or
                    parse_tag_list(self.add) or self.dedupe or self.sort)


_PLAN_FIELDS = {f: type(getattr(CaptionPlan(), f)) for f in CaptionPlan.__dataclass_fields__}


def check_plan(plan: CaptionPlan) -> list[Problem]:
    """Every problem of ``plan``, each naming its field."""
    found = []
    for name, kind in _PLAN_FIELDS.items():
        value = getattr(plan, name)
        if kind is int and (not isinstance(value, int) or isinstance(value, bool)) or \
                kind is not int and not isinstance(value, kind):
            found.append(Problem(name, f"expected {kind.__name__}, got {quote(value)}"))
        elif isinstance(value, str) and len(value) > MAX_TEXT:
            found.append(Problem(name, f"is {len(value)} characters long; at most {MAX_TEXT}"))
    if found:
        return found
    if plan.mode not in MODES:
        found.append(Problem("mode", f"{quote(plan.mode)} is not one of {', '.join(MODES)}"))
    if not 0 <= plan.keep_first <= MAX_KEEP_FIRST:
        found.append(Problem("keep_first", f"must be from 0 to {MAX_KEEP_FIRST}; got {plan.keep_first}"))
    if plan.mode == "regex" and plan.find:
        try:
            re.compile(plan.find)
        except re.error as e:
            found.append(Problem("find", f"{quote(plan.find)} is not a valid regular expression: {e}; escape "
                                         "special characters with \\ or choose the 'text' mode"))
    if plan.mode == "tag" and plan.find and not tags_of(plan.find):
        found.append(Problem("find", "give the tag to replace (it has no text besides commas and spaces)"))
    if not found and plan.empty:
        found.append(Problem("plan", "choose an action: a trigger word, tags to remove, a replacement, a tag to "
                                     "add, deduplicate, or sort"))
    return found


def plan_from_dict(data: Mapping[str, Any]) -> CaptionPlan:
    """A plan from JSON-like values; :class:`ConfigError` naming every unknown or bad field."""
    unknown = [Problem(str(k)[:60], f"unknown field; known fields: {', '.join(_PLAN_FIELDS)}")
               for k in data if k not in _PLAN_FIELDS]
    if unknown:
        raise ConfigError(unknown)
    values = dict(data)
    for key in ("remove", "add", "trigger"):  # a list of tags is accepted too
        if isinstance(values.get(key), list) and all(isinstance(v, str) for v in values[key]):
            values[key] = ", ".join(values[key])
    plan = CaptionPlan(**values)
    problems = check_plan(plan)
    if problems:
        raise ConfigError(problems)
    return plan


def compose(plan: CaptionPlan, frequency: Mapping[str, int] | None = None) -> Callable[[str], str]:
    """The plan as one function caption → caption (checked first: :class:`ConfigError` naming the field)."""
    problems = check_plan(plan)
    if problems:
        raise ConfigError(problems)
    steps: list[Callable[[str], str]] = []
    if plan.find:
        if plan.mode == "tag":
            steps.append(lambda c: replace_tag(c, plan.find, plan.replace_with))
        elif plan.mode == "text":
            steps.append(lambda c: replace_text(c, plan.find, plan.replace_with))
        else:
            pattern = re.compile(plan.find)
            steps.append(lambda c: replace_regex(c, pattern, plan.replace_with))
    removed, added, triggers = parse_tag_list(plan.remove), parse_tag_list(plan.add), parse_tag_list(plan.trigger)
    if removed:
        steps.append(lambda c: remove_tags(c, removed))
    if added:
        steps.append(lambda c: add_tags(c, added))
    if plan.dedupe:
        steps.append(dedupe_tags)
    if plan.sort:
        freq = dict(frequency or {})
        steps.append(lambda c: sort_by_frequency(c, freq, plan.keep_first))
    if triggers:
        steps.append(lambda c: put_first(c, triggers))

    def run(caption: str) -> str:
        for step in steps:
            caption = step(caption)
        return caption

    return run


# ------------------------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class CaptionFile:
    """One image's caption: ``text`` None when it has no caption file (or it cannot be read: see ``problem``)."""

    image: Path
    path: Path  # the caption file (existing or not)
    folder: str  # ss_tag_frequency's name of its N_name folder; "reg: " + that for regularization folders
    is_reg: bool
    text: str | None
    raw: bytes | None  # the file's bytes as read (None: no file)
    encoding: str  # "UTF-8", "UTF-8 with BOM", "UTF-16", "Windows-1252"; "" without a file
    lines: int = 1  # non-empty lines in the file (a multi-line caption is written back as one line)
    problem: str = ""  # why the file cannot be read ("" = it can)


@dataclass
class Captions:
    """Every caption of a dataset (:func:`load_captions`)."""

    train_dir: Path
    reg_dir: Path | None
    caption_extension: str
    files: list[CaptionFile] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)  # in scan order
    problems: list[Problem] = field(default_factory=list)  # unreadable captions, links out (not fatal to Load)

    def in_scope(self, folder: str = ALL) -> list[CaptionFile]:
        if folder != ALL and folder not in self.folders:
            raise ConfigError([Problem("folder", f"{quote(folder)} is not a folder of this dataset; choose one of: "
                                                 f"{', '.join(self.folders) or '(none)'}, or all folders")])
        return [f for f in self.files if folder == ALL or f.folder == folder]

    def frequency(self, folder: str = ALL) -> dict[str, int]:
        """Tag key → images whose caption has it, in ``folder``."""
        out: dict[str, int] = {}
        for f in self.in_scope(folder):
            for key in {tag_key(t) for t in tags_of(f.text or "")}:
                out[key] = out.get(key, 0) + 1
        return out

    def tag_table(self, folder: str = ALL) -> list[dict[str, Any]]:
        """``[{"tag", "count", "folders": {folder: count}}]``, most frequent first (then by tag)."""
        rows: dict[str, dict[str, Any]] = {}
        for f in self.in_scope(folder):
            for key in {tag_key(t) for t in tags_of(f.text or "")}:
                row = rows.setdefault(key, {"tag": key, "count": 0, "folders": {}})
                row["count"] += 1
                row["folders"][f.folder] = row["folders"].get(f.folder, 0) + 1
        return sorted(rows.values(), key=lambda r: (-r["count"], r["tag"]))

    def summary(self) -> dict[str, Any]:
        files = self.files
        return {"train_dir": str(self.train_dir), "reg_dir": str(self.reg_dir) if self.reg_dir else "",
                "folders": list(self.folders), "images": len(files),
                "captions": sum(f.text is not None for f in files),
                "without_caption": sum(f.raw is None for f in files),
                "not_utf8": sum(f.encoding not in ("", "UTF-8") for f in files if f.text is not None),
                "problems": [{"file": p.where, "message": p.message} for p in self.problems]}


def _decode(path: Path, data: bytes, legacy_encoding: bool) -> tuple[str, str, int, str]:
    """(text, encoding, lines, problem) of a caption file's bytes."""
    encoding = ("UTF-16" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else
                "UTF-8 with BOM" if data.startswith(b"\xef\xbb\xbf") else "UTF-8")
    try:
        text = decode_caption(data, path)
        raw_text = data.decode("utf-16" if encoding == "UTF-16" else "utf-8-sig")
    except CaptionError as e:
        if not legacy_encoding or encoding != "UTF-8" or b"\x00" in data:
            hint = "" if legacy_encoding else " (or tick 'read other encodings as Windows-1252')"
            return "", "", 0, e.detail + hint
        try:
            raw_text = data.decode(LEGACY_ENCODING)
        except UnicodeDecodeError as e2:
            return "", "", 0, (f"is neither UTF-8 nor Windows-1252 text (byte 0x{data[e2.start]:02x} at position "
                               f"{e2.start}); open it in a text editor and save it as UTF-8")
        encoding = "Windows-1252"
        text = ", ".join(line.strip() for line in raw_text.splitlines() if line.strip())
    return text, encoding, sum(1 for line in raw_text.splitlines() if line.strip()), ""


def _load_root(root: Path, is_reg: bool, ext: str, legacy_encoding: bool, budget: ScanBudget,
               out: Captions) -> None:
    outside: list[Path] = []
    walked = _walk(root, budget, outside)
    if budget.stopped:
        raise DatasetError([Problem(str(root), f"the scan stopped after {budget.stopped}: this is not a training "
                                               "folder; choose the folder that holds the N_name folders")])
    for p in outside:
        out.problems.append(Problem(str(p), "a link that leads out of the folders this WebUI allows; not read"))
    outside_set = set(outside)
    entries: list[CaptionFile] = []
    for folder, files in walked:
        images = [f for f in files if is_image_file(f)]
        if not images:
            continue
        found = _subset_of(folder, root)
        if found is not None and found[1] == 0:
            continue  # a 0_name folder: the scan never uses its images
        subset_dir = found[0] if found is not None else root
        key = root.name if subset_dir == root else subset_dir.relative_to(root).as_posix()
        label = REG_PREFIX + key if is_reg else key
        for name in images:
            image = folder / name
            cap = image.with_name(image.stem + ext)
            text, raw, encoding, lines, problem = None, None, "", 1, ""
            if cap in outside_set:  # reported above; never read, never written
                problem = "a link that leads out of the folders this WebUI allows; not read"
            elif cap.is_file():
                try:
                    raw = cap.read_bytes()
                except OSError as e:
                    problem = f"cannot be read ({e.strerror or e}); check the file's permissions"
                else:
                    decoded, encoding, lines, problem = _decode(cap, raw, legacy_encoding)
                    text = None if problem else decoded
                if problem:
                    out.problems.append(Problem(str(cap), problem))
            entries.append(CaptionFile(image, cap, label, is_reg, text, raw, encoding, lines, problem))
    for e in sorted(entries, key=lambda e: (e.folder, e.image.parts)):
        if e.folder not in out.folders:
            out.folders.append(e.folder)
        out.files.append(e)


def load_captions(train_dir: str | os.PathLike, reg_dir: str | os.PathLike | None = None, *,
                  caption_extension: str = ".txt", legacy_encoding: bool = False) -> Captions:
    """Every image of the train (and reg) folder with its caption. A folder that cannot be a dataset is a
    :class:`DatasetError`; a caption that cannot be read is listed in ``problems`` (and never written)."""
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    if ext == "." or is_image_file("x" + ext) or len(ext) > 32 or "/" in ext or "\\" in ext:
        raise ConfigError([Problem("caption_extension", f"{quote(caption_extension)} cannot be a caption "
                                                        "extension; use '.txt' or '.caption'")])
    train = Path(train_dir).expanduser()
    reg = Path(reg_dir).expanduser() if reg_dir not in (None, "") else None
    problems: list[Problem] = []
    ok_train = _check_root(train, "training folder", problems)
    ok_reg = _check_root(reg, "regularization folder", problems)
    if ok_train and ok_reg:
        rt, rr = train.resolve(), reg.resolve()
        if rt == rr or rt in rr.parents or rr in rt.parents:
            problems.append(Problem(str(reg), f"the regularization folder and the training folder {train} overlap; "
                                              "keep them in two separate folders"))
    if problems:
        raise DatasetError(problems)
    out = Captions(train, reg, ext)
    budget = ScanBudget(SCAN_LIMITS)
    _load_root(train, False, ext, legacy_encoding, budget, out)
    if reg is not None:
        _load_root(reg, True, ext, legacy_encoding, budget, out)
    if not out.files:
        raise DatasetError([Problem(str(train), "no images found (.png .jpg .jpeg .webp .bmp in N_name "
                                                "sub-folders); check the folder")])
    return out


# ------------------------------------------------------------------------------------------------ preview
@dataclass(frozen=True)
class Change:
    file: CaptionFile
    after: str

    @property
    def before(self) -> str | None:
        return self.file.text


def plan_changes(captions: Captions, plan: CaptionPlan) -> list[Change]:
    """The captions ``plan`` changes (in scope; uncaptioned images only with ``include_uncaptioned``). A caption
    in scope that cannot be read stops it: :class:`CaptionEditError` naming the file."""
    scope = captions.in_scope(plan.folder)
    unreadable = [f for f in scope if f.problem]
    if unreadable:
        names = ", ".join(str(f.path) for f in unreadable[:_NAMED]) + (", …" if len(unreadable) > _NAMED else "")
        raise CaptionEditError(f"{len(unreadable)} caption file(s) cannot be read, so they would be left out: "
                               f"{names} — {unreadable[0].problem}")
    run = compose(plan, captions.frequency(plan.folder))
    changes = []
    for f in scope:
        if f.raw is None and not plan.include_uncaptioned:
            continue
        before = f.text or ""
        after = run(before)
        if f.raw is None and not after:
            continue
        if after != before:
            changes.append(Change(f, after))
    return changes


def _rel(captions: Captions, f: CaptionFile) -> str:
    root = captions.reg_dir if f.is_reg else captions.train_dir
    return (REG_PREFIX if f.is_reg else "") + f.path.relative_to(root).as_posix()


def preview(captions: Captions, plan: CaptionPlan, examples: int = EXAMPLES) -> dict[str, Any]:
    """``{"changed", "considered", "created", "converted", "examples": [{"file", "before", "after"}], "notes"}``."""
    changes = plan_changes(captions, plan)
    considered = [f for f in captions.in_scope(plan.folder) if f.raw is not None or plan.include_uncaptioned]
    created = sum(c.file.raw is None for c in changes)
    converted = [c for c in changes if c.file.encoding not in ("", "UTF-8")]
    joined = sum(c.file.lines > 1 for c in changes)
    notes = []
    if created:
        notes.append(f"{created} image(s) without a caption file get one.")
    if converted:
        kinds = sorted({c.file.encoding for c in converted})
        notes.append(f"{len(converted)} of the changed captions are stored as {' / '.join(kinds)} and are written "
                     "back as UTF-8.")
    if joined:
        notes.append(f"{joined} of the changed captions have several lines and are written back as one line "
                     "(the lines joined with ', ', as training reads them).")
    uncaptioned = sum(f.raw is None for f in captions.in_scope(plan.folder))
    if uncaptioned and not plan.include_uncaptioned:
        notes.append(f"{uncaptioned} image(s) without a caption file are left alone (tick 'also images without "
                     "a caption' to give them one).")
    return {"changed": len(changes), "considered": len(considered), "created": created,
            "converted": len(converted), "notes": notes,
            "examples": [{"file": _rel(captions, c.file), "before": c.before, "after": c.after}
                         for c in changes[:examples]]}


# ------------------------------------------------------------------------------------------------ apply / undo
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def backup_root(train_dir: str | os.PathLike) -> Path:
    return Path(train_dir).expanduser() / BACKUP_DIR


def _new_set(root: Path) -> Path:
    try:
        root.mkdir(exist_ok=True)
    except OSError as e:
        raise CaptionEditError(f"{root}: cannot create the backup folder ({e.strerror or e}); make the dataset "
                               "folder writable") from e
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        candidate = root / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise CaptionEditError(f"{candidate}: cannot create the backup folder ({e.strerror or e})") from e
    raise CaptionEditError(f"{root}: too many backup sets made this second; try again")


def _read_now(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CaptionEditError(f"{path}: cannot be read ({e.strerror or e}); check the file's permissions") from e


def apply_plan(captions: Captions, plan: CaptionPlan) -> dict[str, Any]:
    """Write the captions ``plan`` changes, after a backup set of their previous bytes. Nothing is written when a
    folder is not writable or a caption changed since ``captions`` was loaded (the message names the file); a
    write that fails midway restores the captions written so far. → ``{"changed", "created", "backup"}``."""
    changes = plan_changes(captions, plan)
    if not changes:
        return {"changed": 0, "created": 0, "backup": ""}
    for c in changes:  # before anything is written
        folder = c.file.path.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CaptionEditError(f"{folder}: the folder is not writable, so {c.file.path.name} cannot be written; "
                                   "nothing was changed. Make the folder writable and apply again")
        now = _read_now(c.file.path)
        if now != c.file.raw:
            what = "vanished" if now is None else "appeared" if c.file.raw is None else "changed"
            raise CaptionEditError(f"{c.file.path}: the caption {what} since the captions were loaded; nothing was "
                                   "changed. Load the captions again and preview")
    backup = _new_set(backup_root(captions.train_dir))
    entries = []
    try:
        for i, c in enumerate(changes):
            data = c.after.encode("utf-8")
            entry = {"root": "reg" if c.file.is_reg else "train",
                     "path": c.file.path.relative_to(captions.reg_dir if c.file.is_reg else captions.train_dir)
                     .as_posix(), "existed": c.file.raw is not None, "written_sha256": _sha(data)}
            if c.file.raw is not None:
                entry["backup"] = f"{i:05d}.bak"
                entry["backup_sha256"] = _sha(c.file.raw)
                atomic_write_bytes(backup / entry["backup"], c.file.raw)
            entries.append(entry)
        manifest = {"version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "reg_dir": str(captions.reg_dir.resolve()) if captions.reg_dir else "", "entries": entries}
        atomic_write_text(backup / MANIFEST, json.dumps(manifest, indent=1))
    except OSError as e:
        shutil.rmtree(backup, ignore_errors=True)
        raise CaptionEditError(f"{backup}: the backup could not be written ({e.strerror or e}); nothing was "
                               "changed") from e
    written: list[Change] = []
    try:
        for c in changes:
            atomic_write_bytes(c.file.path, c.after.encode("utf-8"))
            written.append(c)
    except OSError as e:
        failed = changes[len(written)].file.path
        for c in written:  # put back what was written so far
            try:
                if c.file.raw is None:
                    c.file.path.unlink()
                else:
                    atomic_write_bytes(c.file.path, c.file.raw)
            except OSError:
                pass
        shutil.rmtree(backup, ignore_errors=True)
        raise CaptionEditError(f"{failed}: cannot be written ({e.strerror or e}); the captions written before it "
                               "were restored, nothing changed") from e
    return {"changed": len(changes), "created": sum(c.file.raw is None for c in changes), "backup": str(backup)}


def backup_sets(train_dir: str | os.PathLike) -> list[Path]:
    """The backup sets of a dataset, oldest first (complete ones: with a manifest)."""
    root = backup_root(train_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if (p / MANIFEST).is_file()), key=lambda p: p.name)


def undo_last(train_dir: str | os.PathLike, roots: Sequence[str] | None = None) -> dict[str, Any]:
    """Restore the newest backup set of the dataset at ``train_dir`` exactly, then delete the set.
    Refused (:class:`CaptionEditError`, nothing changed) when there is none, or when a caption it covers changed
    or vanished since that apply. ``roots``: the folders files may be written in (a shared WebUI).
    → ``{"restored", "deleted", "backup", "remaining"}``."""
    train = Path(train_dir).expanduser()
    sets = backup_sets(train)
    if not sets:
        raise CaptionEditError(f"{train}: there is nothing to undo (no backup in {backup_root(train)})")
    backup = sets[-1]
    try:
        manifest = json.loads((backup / MANIFEST).read_text("utf-8"))
        entries = manifest["entries"]
        reg = Path(manifest["reg_dir"]) if manifest.get("reg_dir") else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CaptionEditError(f"{backup / MANIFEST}: the backup list cannot be read ({e}); restore by hand from "
                               f"{backup}") from e
    plan: list[tuple[Path, bytes | None]] = []
    changed: list[str] = []
    for entry in entries:
        base = reg if entry.get("root") == "reg" else train
        path = (base / entry["path"]) if base is not None else None
        if path is None or not is_within(path, [base]) or (roots is not None and not is_within(path, roots)):
            raise CaptionEditError(f"{backup / MANIFEST}: lists {quote(entry.get('path'))}, outside the dataset; "
                                   "undo refused")
        now = _read_now(path)
        if now is None or _sha(now) != entry["written_sha256"]:
            changed.append(f"{path} ({'vanished' if now is None else 'changed'})")
            continue
        if entry.get("existed"):
            try:
                data = (backup / entry["backup"]).read_bytes()
            except OSError as e:
                raise CaptionEditError(f"{backup / entry['backup']}: the backup of {path} cannot be read "
                                       f"({e.strerror or e}); undo refused") from e
            if _sha(data) != entry.get("backup_sha256"):
                raise CaptionEditError(f"{backup / entry['backup']}: the backup of {path} is damaged; undo refused")
            plan.append((path, data))
        else:
            plan.append((path, None))
    if changed:
        raise CaptionEditError(f"Undo refused: {len(changed)} caption(s) changed since the apply of {backup.name}: "
                               f"{', '.join(changed[:_NAMED])}{', …' if len(changed) > _NAMED else ''}. Nothing "
                               f"was restored; the previous captions are in {backup} ({MANIFEST} lists them)")
    for path, data in plan:
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise CaptionEditError(f"{path.parent}: the folder is not writable, so {path.name} cannot be restored; "
                                   "nothing was restored")
    restored = deleted = 0
    for path, data in plan:
        try:
            if data is None:
                path.unlink()
                deleted += 1
            else:
                atomic_write_bytes(path, data)
                restored += 1
        except OSError as e:
            raise CaptionEditError(f"{path}: cannot be restored ({e.strerror or e}); {restored + deleted} of "
                                   f"{len(plan)} captions were restored, the backup stays in {backup}") from e
    shutil.rmtree(backup, ignore_errors=True)
    return {"restored": restored, "deleted": deleted, "backup": str(backup), "remaining": len(backup_sets(train))}


# ------------------------------------------------------------------------------------------------ requests
DATASET_FIELDS = {"train_dir": "", "reg_dir": "", "caption_extension": ".txt", "legacy_encoding": False}


def split_request(body: Mapping[str, Any], *, with_plan: bool = True) -> tuple[dict[str, Any], CaptionPlan | None]:
    """A request body → (the dataset fields, the plan); :class:`ConfigError` naming every bad field."""
    found: list[Problem] = []
    dataset = dict(DATASET_FIELDS)
    rest = {}
    for key, value in body.items():
        if key in DATASET_FIELDS:
            kind = type(DATASET_FIELDS[key])
            if not isinstance(value, kind) or (isinstance(value, str) and len(value) > 4096):
                found.append(Problem(key, f"expected {'text' if kind is str else 'true or false'} "
                                          f"(at most 4096 characters), got {quote(value)}"))
            elif isinstance(value, str) and "\x00" in value:
                found.append(Problem(key, "contains a NUL character"))
            else:
                dataset[key] = value.strip() if isinstance(value, str) else value
        else:
            rest[key] = value
    if not dataset["train_dir"] and "train_dir" not in [p.where for p in found]:
        found.append(Problem("train_dir", "give the dataset folder (the one with the N_name folders)"))
    plan = None
    if with_plan:
        try:
            plan = plan_from_dict(rest)
        except ConfigError as e:
            found += e.problems
        except TypeError as e:
            found.append(Problem("body", str(e)))
    elif rest:
        found += [Problem(str(k)[:60], f"unknown field; known fields: {', '.join(DATASET_FIELDS)}") for k in rest]
    if found:
        raise ConfigError(found)
    return dataset, plan


def check_confined(dataset: Mapping[str, Any], roots: Sequence[str] | None) -> None:
    """A shared WebUI (``--hide-ui-dir-config``): the dataset folders must be inside ``roots``."""
    if roots is None:
        return
    bad = [Problem(k, f"this WebUI runs with --hide-ui-dir-config, so only folders under {', '.join(roots)} can "
                      "be used") for k in ("train_dir", "reg_dir") if dataset.get(k) and not is_within(dataset[k], roots)]
    if bad:
        raise ConfigError(bad)
