"""Settings declared once: a config field's help, command-line flag, UI label and group, choices and range.

A config field is declared with :func:`setting` (``rank: int = setting(16, "LoRA rank ...", flag="--rank")``); the
:class:`Setting` rides in the field's ``metadata``. The command line's flags (:mod:`lib_train.cli`), the Trainer tab's
fields (:mod:`lib_train.webui.tab.fields`), the messages of :func:`lib_train.config.validate` and the README check
(tests/test_settings.py) all read it from there, so a setting is added or changed in one place.

This module imports nothing of the trainer; :func:`coerce` is the one type coercion for plain-dict inputs (config
files, the API, the preprocessing options).
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Setting:
    """What users see of one config field. ``help`` may hold ``{default}`` (the method's default, formatted)."""

    help: str  # the flag's --help and the tab's info text (percent signs are plain)
    flag: str | None = None  # the command-line flag; None: see ``no_flag``
    no_flag: str = ""  # why a setting has no flag (required when ``flag`` is None)
    label: str = ""  # the tab's label ("" = the field name, capitalised)
    group: str = ""  # the tab's group (accordion) id; "" = not in the tab, see ``not_in_ui``
    not_in_ui: str = ""  # why the tab has no field for it (required when ``group`` is "")
    ui_order: int = 0  # position in its group: lower first, ties in config order
    choices: tuple | str | None = None  # a closed set, or "module:attribute" of one (read when needed)
    custom: bool = False  # the choices are suggestions: other values (a file) are allowed too
    metavar: str | None = None  # the flag's metavar (default: the choices, else the field name)
    lines: int = 1  # text settings: lines of the tab's text box
    range: tuple[float, float] | None = None  # inclusive (low, high) bounds, where a setting has them
    methods: tuple[str, ...] | None = None  # the methods it applies to (None = every method)
    method_help: dict[str, str] = field(default_factory=dict)  # method → its own --help wording
    split: str = ""  # command line only: this separator stands for a new line (a one-line flag for lines)
    check: str = ""  # "module:function" that raises on a bad value (its message names the problem)
    path: bool = False  # the value names a file or folder: checked for NUL bytes and the file system's length limits

    def help_for(self, method: str) -> str:
        return self.method_help.get(method, self.help)

    def applies_to(self, method: str) -> bool:
        return self.methods is None or method in self.methods


def setting(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - the natural name
    """A dataclass field with ``default`` and its :class:`Setting` (see its attributes for ``kwargs``)."""
    spec = Setting(help=help, **kwargs)
    if spec.flag is None and not spec.no_flag:
        raise ValueError(f"a setting without a flag needs no_flag (the reason): {help!r}")
    if not spec.group and not spec.not_in_ui:
        raise ValueError(f"a setting outside the tab needs not_in_ui (the reason): {help!r}")
    return field(default=default, metadata={"setting": spec})


def spec_of(f: Field) -> Setting:
    """The :class:`Setting` of a dataclass field declared with :func:`setting`."""
    return f.metadata["setting"]


@dataclass(frozen=True)
class Declared:
    """One declared setting: ``key`` = ``"section.field"``, its type and class default, and its :class:`Setting`."""

    key: str
    type: type
    default: Any
    spec: Setting

    @property
    def section(self) -> str:
        return self.key.split(".")[0]

    @property
    def name(self) -> str:
        return self.key.split(".")[1]


def declared(sections: dict[str, type]) -> Iterator[Declared]:
    """Every setting of the section classes, in config order."""
    for section, cls in sections.items():
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            yield Declared(f"{section}.{f.name}", type(default), default, spec_of(f))


def resolve(ref: str) -> Any:
    """``"package.module:attribute"`` → that attribute (imported now)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def choices_of(spec: Setting) -> tuple | None:
    """The setting's choices as a tuple (a ``"module:attribute"`` reference is imported now)."""
    if spec.choices is None or isinstance(spec.choices, tuple):
        return spec.choices
    return tuple(resolve(spec.choices))


def format_default(value: Any) -> str:
    """A default as help texts write it: ``on``/``off``, ``1e-4``, ``8``, ``fp32``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value and abs(value) < 1e-2:
            mantissa, exp = f"{value:.0e}".split("e")
            return f"{mantissa}e{int(exp)}"
        return f"{value:g}"
    return str(value)


# ------------------------------------------------------------------------------------------------ coercion

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
MAX_TEXT = 10_000  # characters of any text setting (prompts, paths, names: real ones are far shorter)
MAX_INT = 2**63 - 1  # an int setting must fit in 64 bits (seeds, counts and sizes go to torch and numpy)
QUOTE_CHARS = 60  # a value quoted in a message is cut to about this many characters


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` for a message, shortened: a long value shows its start and its length, never all of it
    (a wrong 20 MB value must not come back whole in the answer)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} characters)"
    try:
        text = repr(value)
    except RecursionError:  # a deeply nested list or dict
        text = ""
    if isinstance(value, (list, dict, tuple)) and not 0 < len(text) <= limit:
        return f"a {type(value).__name__} of {len(value)} item{'s' if len(value) != 1 else ''}"
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def coerce(value: Any, typ: type) -> Any:
    """``value`` (from JSON, TOML or a form) as a ``typ`` (bool, int, float or str); ValueError when it is not one:
    ``"true"``/``"0"``/``"yes"`` are booleans, ``"3"`` and ``3.0`` are ints, ``"1e-4"`` is a float, a bool is no
    number. Every input passes here, so here are also the limits every setting shares: a float must be finite (NaN
    passes every range check, since all comparisons with it are false), an int must fit in 64 bits, a text has at
    most :data:`MAX_TEXT` characters and no NUL. The message quotes the value shortened (:func:`quote`)."""
    ok = _COERCE.get(typ, lambda v: v)(value)
    if ok is _BAD:
        raise ValueError(f"expected {typ.__name__}, got {quote(value)}")
    problem = limit_problem(ok)
    if problem:
        raise ValueError(problem)
    return ok


def limit_problem(value: Any) -> str | None:
    """What is wrong with a coerced value under the limits every setting shares (see :func:`coerce`), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return f"{quote(value, 30)} is too large (at most {MAX_INT})"
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            return f"{quote(value)} is too long: at most {MAX_TEXT} characters"
        if "\x00" in value:
            return f"{quote(value)} contains a NUL character (\\0); remove it"
    return None


NAME_MAX = 255  # bytes of one file or folder name (ext4, NTFS, APFS, btrfs, xfs)
PATH_MAX = 4096  # bytes of a whole path (Linux)


def path_problem(text: str) -> str | None:
    """What keeps ``text`` from being a path the file system can hold (a NUL byte, a name over :data:`NAME_MAX`
    bytes, a path over :data:`PATH_MAX` bytes), or None; checked before anything looks at the disk, where these
    raise errors that name no setting."""
    if "\x00" in text:
        return f"{quote(text)} contains a NUL character (\\0); remove it"
    try:
        size = len(os.fsencode(text))
    except UnicodeError:
        return f"{quote(text)} holds characters that cannot be in a file name (unpaired surrogates); retype it"
    if size > PATH_MAX:
        return f"{quote(text)} is {size} bytes long; paths are limited to {PATH_MAX} bytes"
    for part in text.replace("\\", "/").split("/"):
        n = len(os.fsencode(part))
        if n > NAME_MAX:
            return (f"a part of the path is {n} bytes long ({quote(part, 30)}); file and folder names are limited "
                    f"to {NAME_MAX} bytes")
    return None


def missing(path: str, kind: str) -> str | None:
    """None when ``path`` is an existing ``kind`` ("file" or "folder"); else why not, as a message says it: "file
    not found: PATH", or that it cannot be read (``Path.is_dir`` raises PermissionError there: a user's problem,
    never a crash)."""
    if os.path.isdir(path) if kind == "folder" else os.path.isfile(path):  # these never raise
        return None
    try:
        os.stat(path)
    except PermissionError:
        return f"{path} cannot be read (permission denied); check the permissions of it and of its folders"
    except (OSError, ValueError):
        pass
    return f"{kind} not found: {path}"


_BAD = object()


def _to_bool(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in _TRUE + _FALSE:
        return v.lower() in _TRUE
    return _BAD


def _to_number(typ: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def to(v: Any) -> Any:
        if isinstance(v, bool):
            return _BAD
        if typ is int and isinstance(v, float):
            return int(v) if v.is_integer() else _BAD
        if isinstance(v, (int, float)):
            return typ(v)
        if isinstance(v, str):
            try:
                return typ(v)
            except ValueError:
                return _BAD
        return _BAD

    return to


_COERCE: dict[type, Callable[[Any], Any]] = {
    bool: _to_bool, int: _to_number(int), float: _to_number(float),
    str: lambda v: v if isinstance(v, str) else _BAD,
}
