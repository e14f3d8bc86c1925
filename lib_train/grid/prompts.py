"""A cell's prompt: ``<lora:STEM:w>`` for a LoRA file, ``(STEM:w)`` for an embedding, so the WebUI's normal
generation applies each file exactly as a user's prompt will later."""

from __future__ import annotations

import re
from typing import Iterable

from .. import methods
from ..errors import TrainerError
from ..settings import resolve
from .axes import NUMBER, format_weight
from .runs import Run

_NET_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::[^>]*)?>", re.IGNORECASE)
_TAG_WEIGHT = re.compile(r"^<(?P<kind>lora|lyco):(?P<name>[^:>]+)(?::(?P<rest>[^>]*))?>$", re.IGNORECASE)


def _lora_tag(stem: str, weight: float) -> str:
    return f"<lora:{stem}:{format_weight(weight)}>"


def _tag_weight(tag: str) -> float | None:
    m = _TAG_WEIGHT.match(tag)
    first = (m.group("rest") or "").split(":")[0].strip() if m else ""
    try:
        return float(first) if first and "=" not in first else None
    except ValueError:
        return None


def set_lora_tag(prompt: str, stem: str, weight: float | None, run_stems: Iterable[str]) -> str:
    """``prompt`` with the run's LoRA tag set to ``<lora:stem:weight>``.

    The first ``<lora:…>`` (or ``<lyco:…>``) tag naming any file of the run is replaced and the run's other tags
    are removed (a LoRA applied twice is applied at twice the weight); without one the tag is appended.
    ``weight=None`` keeps the weight the replaced tag had (1 when there was none).
    """
    names = set(run_stems) | {stem}
    found: list[re.Match] = [m for m in _NET_TAG.finditer(prompt) if m.group(1).strip() in names]
    if not found:
        tag = _lora_tag(stem, 1.0 if weight is None else weight)
        return f"{prompt.rstrip()} {tag}" if prompt.strip() else tag
    if weight is None:
        weight = _tag_weight(found[0].group(0))
        weight = 1.0 if weight is None else weight
    out, pos = [], 0
    for i, m in enumerate(found):
        out.append(prompt[pos:m.start()])
        if i == 0:
            out.append(_lora_tag(stem, weight))
        pos = m.end()
    out.append(prompt[pos:])
    return re.sub(r"  +", " ", "".join(out)).strip() if len(found) > 1 else "".join(out)


def set_last_lora_weight(prompt: str, weight: float) -> str:
    """The prompt's last ``<lora:NAME:…>`` tag with its weight set to ``weight``; TrainerError without a tag."""
    tags = list(_NET_TAG.finditer(prompt))
    if not tags:
        raise TrainerError("Trainer: LoRA weight: the prompt has no <lora:NAME:w> tag to weight; add one, or use "
                           "the 'Trainer: run epoch' axis too")
    m = tags[-1]
    return prompt[:m.start()] + _lora_tag(m.group(1).strip(), weight) + prompt[m.end():]


def _embedding_token(stem: str, weight: float | None) -> str:
    return stem if weight is None or round(weight, 6) == 1 else f"({stem}:{format_weight(weight)})"


def set_embedding_token(prompt: str, stem: str, weight: float | None, run_stems: Iterable[str]) -> str:
    """``prompt`` with every use of the run's embedding (``NAME``, ``NAME-000500``, ``(NAME:0.8)``) replaced by
    ``stem`` at ``weight`` (attention syntax ``(stem:w)``; plain ``stem`` at 1). Without one, ``stem`` is put in
    front. ``weight=None`` keeps the first use's weight."""
    names = sorted(set(run_stems) | {stem}, key=len, reverse=True)
    alt = "|".join(re.escape(n) for n in names)
    use = re.compile(rf"\(\s*(?:{alt})\s*:\s*(?P<w>{NUMBER})\s*\)|(?<![\w-])(?:{alt})(?![\w-])")
    first = use.search(prompt)
    if weight is None and first is not None and first.group("w") is not None:
        weight = float(first.group("w"))
    token = _embedding_token(stem, weight)
    if first is None:
        return f"{token}, {prompt}" if prompt.strip() else token
    return use.sub(lambda _: token, prompt)


def cell_prompt(run: Run, prompt: str, stem: str, weight: float | None) -> str:
    """The prompt of one cell: the run's tag (LoRA) or token (embedding) set to ``stem`` at ``weight`` (the run's
    method says how: ``Method.set_prompt``)."""
    return resolve(methods.get(run.kind).set_prompt)(prompt, stem, weight, run.stems)
