"""The sample prompts of ``sample.prompts``, line by line, with the per-line options kohya's users write.

One prompt per line; blank lines and lines starting with ``#`` (comments, as in kohya's sample-prompt files) are
skipped. After the prompt text a line may set its own options, each an option name after ``--`` and its value up
to the next option (names are case-insensitive)::

    a photo of [name], smiling --n blurry, lowres, bad hands --w 512 --h 768 --s 28 --l 7 --d 42

===========  =====================  ===========================================================================
option       meaning                values
===========  =====================  ===========================================================================
``--n``      negative prompt        any text up to the next option (commas and spaces are part of it);
                                    ``--n ""`` = no negative prompt for this line
``--w``      width                  a multiple of 8 from 64 to 2048
``--h``      height                 a multiple of 8 from 64 to 2048
``--s``      sampling steps         1 to 150
``--l``      CFG scale              1 to 30
``--d``      seed                   0 to 4294967295
``--ss``     sampler                the WebUI's sampler name (``Euler a``) or kohya's (``k_euler_a``, mapped by
                                    :data:`KOHYA_SAMPLERS`); headless runs always use DDIM
===========  =====================  ===========================================================================

What a line does not set comes from the ``[sample]`` settings (``sample.negative``, ``sample.width`` …); a line
without ``--d`` uses ``sample.seed + i`` for the i-th prompt (0-based), as before. A value may be put in quotes
(``--n "a, b"``, ``--ss 'Euler a'``). Kohya options that make no sense here (``--cn`` ControlNet image, ``--g``
distilled guidance, …) are refused with the reason, as are unknown options, options without a value, a number that
does not parse, an option given twice, and a size or count out of bounds: every problem names its line
(``sample prompt line 2: --w 513 is not a multiple of 8``), and :func:`lib_train.config.validate` reports them
before a run starts.

Pure: no torch, no WebUI.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# The bounds of a line's options; the same as the [sample] settings' (tests/test_sample_prompts.py keeps them equal).
SIZE_RANGE = (64, 2048)
SIZE_MULTIPLE = 8
STEPS_RANGE = (1, 150)
CFG_RANGE = (1.0, 30.0)
SEED_RANGE = (0, 2 ** 32 - 1)  # the WebUI's seeds are 32-bit

COMMENT = "#"

# kohya's sample samplers (its ``--sample_sampler`` / ``--ss`` names) → the nearest sampler of the WebUI
KOHYA_SAMPLERS = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS", "k_lms": "LMS",
    "euler": "Euler", "k_euler": "Euler",
    "euler_a": "Euler a", "k_euler_a": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2", "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a",
    "dpmsolver": "DPM++ 2M", "dpmsolver++": "DPM++ 2M", "dpmsingle": "DPM++ 2M",
}

OPTIONS = {  # name → (field, what it is)
    "n": ("negative", "negative prompt"),
    "w": ("width", "width"),
    "h": ("height", "height"),
    "s": ("steps", "sampling steps"),
    "l": ("cfg_scale", "CFG scale"),
    "d": ("seed", "seed"),
    "ss": ("sampler", "sampler"),
}

# options of kohya's sample-prompt lines that have no meaning for these samples, with why
NOT_HERE = {
    "cn": "a ControlNet image: the samples are made without ControlNet",
    "g": "the distilled guidance of FLUX-type models: Stable Diffusion uses the CFG scale (--l)",
    "f": "a video frame count: the samples are still images",
    "fs": "a flow-matching shift: Stable Diffusion samples do not use one",
    "ctr": "a CFG truncation ratio of other model families: not used here",
    "rcfg": "a CFG renormalisation of other model families: not used here",
    "am": "an attention-mask setting of other model families: not used here",
}

OPTION_LIST = "--n (negative prompt), --w (width), --h (height), --s (steps), --l (CFG scale), --d (seed), " \
              "--ss (sampler)"

# an option: "--" at the start or after white space, then a letter; its name runs to the next white space
_OPTION_RE = re.compile(r"(?<!\S)--([A-Za-z]\S*)")
_INT_RE = re.compile(r"[+-]?\d+")
_EXAMPLES = {"w": "512", "h": "768", "s": "28", "d": "42", "l": "7", "n": "blurry, lowres", "ss": "Euler a"}


@dataclass(frozen=True)
class PromptLine:
    """One sample prompt with what its line sets (None: the ``[sample]`` setting applies)."""

    line: int  # 1-based line number in ``sample.prompts``
    prompt: str  # white space collapsed; ``[name]`` not filled in yet
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None  # the WebUI's name (kohya's names mapped)


class SamplePromptError(ValueError):
    """The problems of the sample prompts, one ``sample prompt line N: …`` text each (``problems``)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def prompt_lines(text: str) -> list[tuple[int, str]]:
    """The prompt lines of ``text`` with their 1-based line numbers: blank lines and ``#`` comments skipped."""
    out = []
    for number, raw in enumerate(str(text).splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith(COMMENT):
            out.append((number, line))
    return out


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1].strip()
    return value


def _shown(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[:limit - 1] + "…"


def _whole(name: str, value: str, low: int, high: int, what: str, *, multiple: int = 1) -> tuple[int | None, str]:
    if not _INT_RE.fullmatch(value):
        return None, f"--{name} {_shown(value)} is not a whole number (the {what}, e.g. --{name} {_EXAMPLES[name]})"
    number = int(value)
    if not low <= number <= high:
        return None, f"--{name} {number} is outside {low}-{high} (the {what})"
    if multiple > 1 and number % multiple:
        lower = number - number % multiple
        near = " or ".join(str(v) for v in (lower, lower + multiple) if low <= v <= high)
        return None, f"--{name} {number} is not a multiple of {multiple} (use {near})"
    return number, ""


def parse_line(line: str, number: int = 1) -> tuple[PromptLine, list[str]]:
    """One prompt line → its record and the problems found (each ``sample prompt line N: …``); with problems the
    record holds only the options that were valid."""
    problems: list[str] = []

    def bad(message: str) -> None:
        problems.append(f"sample prompt line {number}: {message}")

    matches = list(_OPTION_RE.finditer(line))
    prompt = line[:matches[0].start()] if matches else line
    values: dict[str, object] = {}
    seen: set[str] = set()
    for k, m in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(line)
        raw_name, raw_value = m.group(1), line[m.end():end].strip()
        name = raw_name.lower()
        if name not in OPTIONS:
            glued = re.fullmatch(r"(ss|[nwhsld])(\S+)", name)
            if name in NOT_HERE:
                bad(f"--{raw_name} is kohya's option for {NOT_HERE[name]}; remove it")
            elif glued and (glued.group(1) == "n" or re.fullmatch(r"[\d.+-]+", glued.group(2))):
                bad(f"--{raw_name}: put a space between the option and its value (--{glued.group(1)} "
                    f"{_shown(raw_name[len(glued.group(1)):])})")
            else:
                bad(f"unknown option --{_shown(raw_name, 20)}; the options are {OPTION_LIST}")
            continue
        field, what = OPTIONS[name]
        if name in seen:
            bad(f"--{name} is given twice; keep one")
            continue
        seen.add(name)
        value = _unquote(raw_value)
        if not raw_value or (not value and name != "n"):
            bad(f"--{name} has no value; write the {what} after it (e.g. --{name} {_EXAMPLES[name]})")
            continue
        if name == "n":
            values[field] = " ".join(value.split())
        elif name == "ss":
            values[field] = KOHYA_SAMPLERS.get(value.lower(), " ".join(value.split()))
        elif name in ("w", "h"):
            number_, msg = _whole(name, value, *SIZE_RANGE, what, multiple=SIZE_MULTIPLE)
            if msg:
                bad(msg)
            else:
                values[field] = number_
        elif name == "s":
            number_, msg = _whole(name, value, *STEPS_RANGE, what)
            if msg:
                bad(msg)
            else:
                values[field] = number_
        elif name == "d":
            number_, msg = _whole(name, value, *SEED_RANGE, what)
            if msg and value.startswith("-") and _INT_RE.fullmatch(value):
                msg = f"--d {value}: a random seed is not possible here, give a fixed one from 0 to {SEED_RANGE[1]} " \
                      "(so the sets of samples compare)"
            if msg:
                bad(msg)
            else:
                values[field] = number_
        elif name == "l":
            try:
                scale = float(value)
            except ValueError:
                scale = math.nan
            if not math.isfinite(scale):
                bad(f"--l {_shown(value)} is not a number (the CFG scale, e.g. --l 7)")
                continue
            low, high = CFG_RANGE
            if not low <= scale <= high:
                bad(f"--l {_shown(value)} is outside {low:g}-{high:g} (the CFG scale; 7 is typical)")
            else:
                values[field] = scale
    record = PromptLine(line=number, prompt=" ".join(prompt.split()), **values)  # type: ignore[arg-type]
    return record, problems


def parse_prompts(text: str) -> tuple[list[PromptLine], list[str]]:
    """Every prompt line of ``text`` (see :func:`prompt_lines`) and every problem of any line."""
    records, problems = [], []
    for number, line in prompt_lines(text):
        record, found = parse_line(line, number)
        records.append(record)
        problems += found
    return records, problems


def parse_prompts_strict(text: str) -> list[PromptLine]:
    """:func:`parse_prompts`, raising :class:`SamplePromptError` with every problem if there is one."""
    records, problems = parse_prompts(text)
    if problems:
        raise SamplePromptError(problems)
    return records
