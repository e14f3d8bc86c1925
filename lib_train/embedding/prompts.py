"""Training prompts of an embedding: template lines with ``[name]`` and ``[filewords]``.

A template is a list of prompt lines. ``[name]`` becomes the embedding's name (the text the WebUI replaces by the
vectors) and ``[filewords]`` the image's caption after shuffle/dropout. A line is drawn for every sample of every
step (not fixed once per image, as the WebUI's trainer does), from the sample's own seed, so a resumed run draws the
same lines. Built-in sets: ``subject`` and ``style`` (``templates/*.txt``, written for this project); ``none`` uses
the caption alone, which must then contain the name (or ``[name]``). A custom template is a UTF-8 text file with one
line per prompt; empty lines and lines starting with ``#`` are skipped; every line must contain ``[name]``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import TrainerError

NAME = "[name]"
FILEWORDS = "[filewords]"
BUILTIN = ("subject", "style")
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def load_template(spec: str) -> list[str] | None:
    """The lines of template ``spec`` ("subject", "style", a file path), or None for "none"."""
    if spec == "none":
        return None
    path = TEMPLATE_DIR / f"{spec}.txt" if spec in BUILTIN else Path(spec)
    if not path.is_file():
        raise TrainerError(f"{spec!r} is neither subject, style, none nor an existing template file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise TrainerError(f"cannot read the template file {path} as UTF-8 text ({e})") from None
    lines, missing = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if NAME not in line:
            missing.append(str(number))
        lines.append(line)
    if missing:
        raise TrainerError(f"{path}: line {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} has no "
                           f"{NAME}; every template line must contain {NAME} (the embedding) and may contain "
                           f"{FILEWORDS} (the caption)")
    if not lines:
        raise TrainerError(f"{path} has no template lines; write one prompt per line, e.g. 'a photo of {NAME}, "
                           f"{FILEWORDS}'")
    return lines


_EMPTY_PARTS = re.compile(r"\s*,(?:\s*,)+")  # ", ," left by an empty [filewords]


def fill(line: str, name: str, filewords: str) -> str:
    """``line`` with ``[filewords]`` and then ``[name]`` replaced (a ``[name]`` in a caption is replaced too). When
    the caption is empty, the separators it leaves behind (``"a photo of x, "``) are removed."""
    text = line.replace(FILEWORDS, filewords).replace(NAME, name)
    if filewords.strip():
        return text
    return _EMPTY_PARTS.sub(",", " ".join(text.split())).strip(" ,")


def caption_names(caption: str, name: str) -> bool:
    """Whether a caption used without template holds the embedding: ``[name]``, or the name's token sequence (the
    WebUI matches tokens, so ``laohuangs`` does not hold ``laohuang``). CLIP BPE ids are the same for SD1 and SD2."""
    from open_clip.tokenizer import _tokenizer

    wanted = _tokenizer.encode(name)
    tokens = _tokenizer.encode(caption.replace(NAME, name))
    n = len(wanted)
    return n > 0 and any(tokens[i:i + n] == wanted for i in range(len(tokens) - n + 1))
