"""What the API accepts, checked before anything touches the disk or the model: plain functions, no FastAPI and
no WebUI, so the tests run them without either (:mod:`.api` calls them on every request).

- :func:`parse_json_body`: at most :data:`MAX_BODY_BYTES` (413 past it), UTF-8 JSON (``NaN`` and ``Infinity`` are
  not JSON), nested at most :data:`MAX_DEPTH` levels (a body nested 100,000 levels deep is refused, not a
  RecursionError);
- :func:`conditioning_request`: the body of ``POST /trainer/v1/diagnostics/conditioning``, every field's type,
  count and range;
- :func:`short_id`: a path parameter as an answer may quote it.

A refusal is :class:`BadRequest`: its ``status`` (422, or 413 for a body too large) and ``detail`` in the shape
FastAPI gives its own validation errors (``[{"loc": [...], "msg": ..., "type": ...}]``), naming the field and
quoting the value shortened (:func:`lib_train.settings.quote`), never the whole of a large value.
"""

from __future__ import annotations

import json
from typing import Any

from ..config import SETTINGS
from ..settings import MAX_TEXT, QUOTE_CHARS, limit_problem, quote

MAX_BODY_BYTES = 1 << 20
"""The largest request body (1 MiB): a config, with 16 sample prompts, is a few KiB."""
MAX_DEPTH = 8
"""The deepest nesting of a body (a config is 2 levels: sections of settings; conditioning sizes are 2 too)."""
MAX_PROMPTS = 64
MAX_SIZES = 16
SIDE_RANGE = (64, 4096)


class BadRequest(Exception):
    """A request the API refuses: HTTP ``status`` with ``detail`` (a list of ``{"loc", "msg", "type"}``)."""

    def __init__(self, detail: list[dict[str, Any]], status: int = 422):
        self.status = status
        self.detail = detail
        super().__init__("; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail))


def problem(loc: list[Any], msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def _depth(data: Any) -> int:
    """The nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            stack += [(v, depth) for v in (value.values() if isinstance(value, dict) else value)]
    return deepest


def parse_json_body(raw: bytes, *, limit: int = MAX_BODY_BYTES) -> Any:
    """The JSON value of a request body (an empty body is None); :class:`BadRequest` when it is too large, not
    UTF-8 JSON, or nested deeper than :data:`MAX_DEPTH`."""
    if len(raw) > limit:
        raise BadRequest([problem(["body"], f"the body is {len(raw)} bytes; at most {limit} bytes are accepted",
                                  "value_error.too_large")], status=413)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadRequest([problem(["body"], f"is not UTF-8 text (byte {e.start})", "value_error.jsondecode")]) \
            from None
    if not text.strip():
        return None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest([problem(["body"], f"is nested too deeply; at most {MAX_DEPTH} levels are accepted",
                                  "value_error.jsondecode")]) from None
    except ValueError as e:
        raise BadRequest([problem(["body"], f"not valid JSON: {str(e)[:200]}", "value_error.jsondecode")]) from None
    if _depth(data) > MAX_DEPTH:
        raise BadRequest([problem(["body"], f"is nested too deeply; at most {MAX_DEPTH} levels are accepted",
                                  "value_error.jsondecode")])
    return data


def json_object(data: Any, example: str) -> dict[str, Any]:
    """``data`` when it is a JSON object; else :class:`BadRequest` with ``example`` of one."""
    if not isinstance(data, dict):
        raise BadRequest([problem(["body"], f"must be a JSON object, e.g. {example}; got {quote(data)}",
                                  "type_error.dict")])
    return data


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def conditioning_request(data: Any) -> dict[str, Any]:
    """``{"prompts": [...], "clip_skip": 1, "sizes": [[w, h], ...], "embedding": ""}`` checked: 1 to :data:`MAX_PROMPTS` prompts of
    text, ``clip_skip`` within ``model.clip_skip``'s range, 1 to :data:`MAX_SIZES` sizes with sides in
    :data:`SIDE_RANGE`. Returns the values (defaults filled in); :class:`BadRequest` naming every bad field."""
    body = json_object(data, '{"prompts": ["a photo of a cat"], "clip_skip": 1}')
    found: list[dict[str, Any]] = []
    known = ("prompts", "clip_skip", "sizes", "embedding")
    for key in body:
        if key not in known:
            found.append(problem(["body", key[:QUOTE_CHARS]], f"unknown field; known fields: {', '.join(known)}",
                                 "value_error.extra"))
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_PROMPTS:
        found.append(problem(["body", "prompts"], f"give a list of 1 to {MAX_PROMPTS} prompts (text); got "
                                                  f"{quote(prompts)}", "type_error.list"))
    else:
        for i, p in enumerate(prompts):
            msg = (f"expected text, got {quote(p)}" if not isinstance(p, str) else limit_problem(p))
            if msg:
                found.append(problem(["body", "prompts", i], msg))
    clip_skip = body.get("clip_skip", 1)
    low, high = SETTINGS["model.clip_skip"].range  # type: ignore[misc]
    if not _int(clip_skip) or not low <= clip_skip <= high:
        found.append(problem(["body", "clip_skip"], f"must be a whole number from {int(low)} to {int(high)} "
                                                    f"(1 = last layer, 2 = penultimate); got {quote(clip_skip)}"))
    sizes = body.get("sizes", [[1024, 1024]])
    if not isinstance(sizes, list) or not 1 <= len(sizes) <= MAX_SIZES:
        found.append(problem(["body", "sizes"], f"give a list of 1 to {MAX_SIZES} [width, height] pairs; got "
                                                f"{quote(sizes)}", "type_error.list"))
    else:
        for i, size in enumerate(sizes):
            if not (isinstance(size, list) and len(size) == 2 and all(_int(v) and SIDE_RANGE[0] <= v <= SIDE_RANGE[1]
                                                                       for v in size)):
                found.append(problem(["body", "sizes", i], f"must be [width, height], whole numbers from "
                                                           f"{SIDE_RANGE[0]} to {SIDE_RANGE[1]}; got {quote(size)}"))
    embedding = body.get("embedding", "")  # SDXL: a loaded embedding's name to encode the prompts with on both sides
    msg = f"expected the name of a loaded embedding, got {quote(embedding)}" if not isinstance(embedding, str) \
        else limit_problem(embedding)
    if msg:
        found.append(problem(["body", "embedding"], msg))
    if found:
        raise BadRequest(found)
    return {"prompts": prompts, "clip_skip": clip_skip, "sizes": [tuple(s) for s in sizes], "embedding": embedding}


def short_id(job_id: str) -> str:
    """A job id (a path parameter) as an answer quotes it: ids are 12 hex digits, anything longer is cut."""
    return job_id if len(job_id) <= 24 else job_id[:24] + "…"


__all__ = ["MAX_BODY_BYTES", "MAX_DEPTH", "MAX_TEXT", "BadRequest", "conditioning_request", "json_object",
           "parse_json_body", "problem", "short_id"]
