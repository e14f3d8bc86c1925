"""HTTP API under ``/trainer/v1/`` (registered on the WebUI's FastAPI app at ``on_app_started``).

Jobs (one at a time; see :mod:`.jobs`):

- ``POST /trainer/v1/jobs`` — body: a config as JSON (the config-file schema; ``model.checkpoint`` is ignored,
  ``output.output_dir`` defaults to ``<Lora folder>/<output.name>``) → the job's status (200). Bad JSON, a bad
  setting or a bad dataset file → 422 with ``detail`` = ``[{"loc": [...], "msg": ..., "type": ...}]`` naming each
  field (``["body", "network", "rank"]``) or file (``["dataset", path]``); another job active, or a checkpoint /
  WebUI mode that cannot be trained → 409 with ``detail`` saying why.
- ``GET /trainer/v1/jobs`` — every job of this WebUI session, newest first; ``GET /trainer/v1/jobs/{id}`` — one
  (404 if unknown). Status fields: :class:`~lib_train.webui.jobs.JobStatus`.
- ``POST /trainer/v1/jobs/{id}/interrupt`` — stop after the current step (saves the file and the resume state);
  ``POST /trainer/v1/jobs/{id}/resume`` — a new job continuing an interrupted one from its resume state.
- ``GET /trainer/v1/host`` — whether the loaded checkpoint can be trained here, and why not.

Diagnostics (read-only; they wait for the queue lock, so never during a run or a generation):

- ``GET /trainer/v1/model-hash`` — sha256 of the loaded model's state dict and counts of its flags
  (``requires_grad``, training mode, instance forwards, hooks), and its ``--medvram`` state (the WebUI's memory
  hooks by module, the part on the GPU, the devices in use): proves a run left it unchanged;
- ``POST /trainer/v1/diagnostics/conditioning`` — body ``{"prompts": [...], "clip_skip": 1}``: the WebUI's prompt
  encoding against the headless one, per prompt; SDXL also takes ``"sizes": [[width, height], ...]`` and compares
  the context and the vector ``y`` per size, per prompt and for all prompts as one batch, and ``"embedding": NAME``
  (an SDXL embedding the WebUI has loaded): both sides with it, the WebUI's as at inference, ours as a run trains.

Captions in bulk (:mod:`lib_train.data.caption_edit`; dataset fields ``train_dir``, ``reg_dir``,
``caption_extension``, ``legacy_encoding``; with ``--hide-ui-dir-config`` only folders under the upload folder):

- ``GET /trainer/v1/captions/tags?train_dir=...`` — the folders, counts and the tag table (tag, images, per folder);
- ``POST /trainer/v1/captions/preview`` / ``apply`` — body: the dataset fields and a
  :class:`~lib_train.data.caption_edit.CaptionPlan` (``trigger``, ``remove``, ``find``/``replace_with``/``mode``,
  ``add``, ``dedupe``, ``sort``/``keep_first``, ``folder``, ``include_uncaptioned``) → the count and before/after
  examples, or what was written and the backup set; ``POST /trainer/v1/captions/undo`` — body ``{"train_dir"}``:
  restores the last apply (409 when the captions changed since).

When the WebUI runs with ``--api-auth user:password[,user2:password2]`` every route requires HTTP Basic
authentication with one of those pairs, as the WebUI's own API does.

Bad input is never a 500: every body is read through :mod:`.api_input` (at most 1 MiB, else 413; JSON nested at
most 8 levels; NaN/Infinity refused) and every field is checked before anything touches the disk or the model
(types, lengths: names and paths within the file system's limits, ranges); a refusal is a 422 whose ``detail``
names the field and quotes the value shortened.
"""

from __future__ import annotations

import dataclasses
from secrets import compare_digest
from typing import Any, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.concurrency import run_in_threadpool

from ..errors import ConfigError, DatasetError, TrainerError
from .api_input import MAX_BODY_BYTES, BadRequest, conditioning_request, json_object, parse_json_body, problem, \
    short_id
from .jobs import manager

PREFIX = "/trainer/v1"


def _api_credentials() -> dict[str, str]:
    from modules import shared

    pairs = [p.split(":", 1) for p in (shared.cmd_opts.api_auth or "").split(",") if ":" in p]
    return {user: password for user, password in pairs}


def require_auth(credentials: HTTPBasicCredentials = Depends(HTTPBasic())) -> None:
    """HTTP Basic check against ``--api-auth`` (only attached to the routes when that flag is set)."""
    expected = _api_credentials().get(credentials.username)
    if expected is None or not compare_digest(credentials.password, expected):
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})


def _unprocessable(detail: list[dict[str, Any]], message: str) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": detail, "message": message})


def _refused(e: BadRequest) -> JSONResponse:
    return JSONResponse(status_code=e.status, content={"detail": e.detail, "message": str(e)})


async def read_json(request: Request) -> Any:
    """The request's JSON body (:func:`.api_input.parse_json_body`), read at most :data:`MAX_BODY_BYTES` + 1 bytes
    far: a larger body is refused (413) without being held in memory whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest([problem(["body"], f"the body is {declared} bytes; at most {MAX_BODY_BYTES} bytes are "
                                            "accepted", "value_error.too_large")], status=413)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            break
    return parse_json_body(bytes(raw))


def _field_loc(where: str) -> list[str]:
    """``"network.rank (--rank)"`` → ``["body", "network", "rank"]``."""
    return ["body", *where.split(" ", 1)[0].split(".")]


def _trainer_refusal(e: TrainerError, loc: Callable[[str], list[str]], config_type: str) -> JSONResponse:
    """A refusal of the library as an answer: bad settings (``loc`` places each field) or a bad dataset (the file
    named) → 422 with one entry per problem; anything else it refused (a job already running, an Undo that cannot be
    done) → 409 saying why."""
    if isinstance(e, ConfigError):
        return _unprocessable([{"loc": loc(p.where), "msg": p.message, "type": config_type} for p in e.problems],
                              str(e))
    if isinstance(e, DatasetError):
        return _unprocessable([{"loc": ["dataset", p.where], "msg": p.message, "type": "value_error.dataset"}
                               for p in e.problems], str(e))
    return JSONResponse(status_code=409, content={"detail": str(e)})


def _job_response(create_kwargs: dict[str, Any]) -> JSONResponse:
    try:
        job = manager.create(**create_kwargs)
    except TrainerError as e:
        return _trainer_refusal(e, _field_loc, "value_error.config")
    created = job.snapshot()  # as created ("queued"), before the job's thread can change it
    manager.start(job)
    return JSONResponse(created)


async def create_job(request: Request) -> JSONResponse:
    try:
        data = json_object(await read_json(request), '{"data": {"train_dir": ...}, "output": {"name": ...}}')
    except BadRequest as e:
        return _refused(e)
    return await run_in_threadpool(_job_response, {"data": data})


def _job_or_404(job_id: str):
    job = manager.get(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no training job '{short_id(job_id)}' in this WebUI session")
    return job


def list_jobs() -> list[dict[str, Any]]:
    return [job.snapshot() for job in manager.jobs()]


def list_runs() -> list[dict[str, Any]]:
    """Training runs on disk (LoRA runs under the Lora folder, embedding runs under the embeddings folder), with
    their files in training order — what the epoch × weight grid offers."""
    from .grid.script import list_runs as runs_on_disk

    return [{"label": r.label, "kind": r.kind, "name": r.name, "folder": str(r.folder),
             "config": str(r.config) if r.config else None,
             "files": [{"stem": f.stem, "path": str(f.path), "role": f.role, "epoch": f.epoch, "step": f.step}
                       for f in r.files]}
            for r in runs_on_disk()]


def get_job(job_id: str) -> dict[str, Any]:
    return _job_or_404(job_id).snapshot()


def interrupt_job(job_id: str) -> dict[str, Any]:
    _job_or_404(job_id)
    return manager.interrupt(job_id).snapshot()


def resume_job(job_id: str) -> JSONResponse:
    status = _job_or_404(job_id).status
    if status.state != "interrupted" or not status.state_dir:
        return JSONResponse(status_code=409, content={"detail": f"job {job_id} is {status.state} and has no resume "
                                                                "state; only an interrupted job can be resumed"})
    return _job_response({"resume_dir": status.state_dir})


def host_status() -> dict[str, Any]:
    from .host import inspect_host

    return dataclasses.asdict(inspect_host())


def _loaded_model():
    from modules import shared

    model = shared.sd_model
    if model is None:
        raise HTTPException(status_code=409, detail="no checkpoint is loaded")
    return model


def model_hash() -> dict[str, Any]:
    from modules import call_queue

    from .diagnostics import module_flags, state_dict_hash
    from .lowvram import hook_summary

    with call_queue.queue_lock:
        model = _loaded_model()
        info = getattr(model, "sd_checkpoint_info", None)
        return {"checkpoint": getattr(info, "title", ""), **state_dict_hash(model), "flags": module_flags(model),
                "lowvram": hook_summary(model)}


async def conditioning_route(request: Request) -> Any:
    """``POST /diagnostics/conditioning``: the body checked (:func:`.api_input.conditioning_request`), then
    :func:`conditioning_check` off the event loop."""
    try:
        req = conditioning_request(await read_json(request))
    except BadRequest as e:
        return _refused(e)
    return await run_in_threadpool(conditioning_check, req["prompts"], req["clip_skip"], req["sizes"],
                                   req["embedding"])


def conditioning_check(prompts: list[str], clip_skip: int, sizes: list[tuple[int, int]],
                       embedding: str = "") -> dict[str, Any]:
    from modules import call_queue

    from .diagnostics import compare_conditioning
    from .host import classify_model

    with call_queue.queue_lock:
        model = _loaded_model()
        family, reason = classify_model(model)
        if family is None:
            raise HTTPException(status_code=409, detail=reason)
        if hasattr(model, "conditioner"):  # sgm (SDXL): context and vector per image size
            from .diagnostics import compare_sdxl_conditioning

            try:
                results = compare_sdxl_conditioning(model, prompts, sizes, clip_skip, embedding)
            except TrainerError as e:
                raise HTTPException(status_code=422, detail=str(e)) from None
        elif embedding:
            raise HTTPException(status_code=422, detail="embedding: only for an SDXL checkpoint (SD1/SD2 embeddings "
                                                        "are compared by tests/webui/test_embedding_webui.py)")
        else:
            results = compare_conditioning(model, family, prompts, clip_skip)
        return {"family": family, "clip_skip": clip_skip, "results": results}


async def preprocess_json(request: Request) -> Any:
    """``POST /preprocess``: the body read as every route's (size, nesting), then
    :func:`.preprocess.preprocess_route` off the event loop (it checks every option before touching a folder)."""
    from .preprocess import preprocess_route

    try:
        body = json_object(await read_json(request), '{"source_dir": "/path/raw", "width": 512, "height": 512}')
    except BadRequest as e:
        return _refused(e)
    return await run_in_threadpool(preprocess_route, body)


def caption_roots() -> list[str] | None:
    """The folders datasets may be read from and captions written in: the upload folder with
    ``--hide-ui-dir-config`` (as for a job's dataset), else None (any)."""
    from .jobs import restricted_roots

    roots = restricted_roots()
    return None if roots is None else [roots["data"]]


def caption_action(action: str, body: dict[str, Any]) -> JSONResponse:
    """``/captions/{tags,preview,apply,undo}`` (:mod:`lib_train.data.caption_edit`): a bad field → 422 naming it
    (``["body", field]``, or ``["dataset", file]``); an edit that cannot be done (a folder not writable, an Undo
    refused) → 409 with ``detail`` saying why."""
    from ..data import caption_edit as ce
    from ..data.dataset import confined_to

    try:
        dataset, plan = ce.split_request(body, with_plan=action in ("preview", "apply"))
        roots = caption_roots()
        ce.check_confined(dataset, roots)
        if action == "undo":
            return JSONResponse(ce.undo_last(dataset["train_dir"], roots))
        with confined_to(roots):
            captions = ce.load_captions(dataset["train_dir"], dataset["reg_dir"] or None,
                                        caption_extension=dataset["caption_extension"],
                                        legacy_encoding=dataset["legacy_encoding"])
        if action == "tags":
            return JSONResponse({**captions.summary(), "tags": captions.tag_table()})
        result = ce.preview(captions, plan) if action == "preview" else ce.apply_plan(captions, plan)
        return JSONResponse(result)
    except TrainerError as e:
        return _trainer_refusal(e, lambda where: ["body", where], "value_error.captions")


async def caption_tags(request: Request) -> JSONResponse:
    """``GET /captions/tags?train_dir=...&reg_dir=...&caption_extension=.txt&legacy_encoding=false``."""
    query = dict(request.query_params)
    flag = query.get("legacy_encoding", "false").lower()
    query["legacy_encoding"] = {"true": True, "1": True, "false": False, "0": False}.get(flag, flag)
    return await run_in_threadpool(caption_action, "tags", query)


def _caption_post(action: str):
    async def route(request: Request) -> JSONResponse:
        try:
            body = json_object(await read_json(request), '{"train_dir": "/path/dataset", "trigger": "mychar"}')
        except BadRequest as e:
            return _refused(e)
        return await run_in_threadpool(caption_action, action, body)

    route.__name__ = f"caption_{action}"
    return route


def register_routes(_demo: Any, app: FastAPI) -> None:
    """``on_app_started`` callback: add every route of this module to the WebUI's app."""
    from modules import shared

    deps = [Depends(require_auth)] if shared.cmd_opts.api_auth else []
    routes = [
        ("/jobs", create_job, "POST"),
        ("/jobs", list_jobs, "GET"),
        ("/jobs/{job_id}", get_job, "GET"),
        ("/runs", list_runs, "GET"),
        ("/jobs/{job_id}/interrupt", interrupt_job, "POST"),
        ("/jobs/{job_id}/resume", resume_job, "POST"),
        ("/host", host_status, "GET"),
        ("/model-hash", model_hash, "GET"),
        ("/diagnostics/conditioning", conditioning_route, "POST"),
        ("/preprocess", preprocess_json, "POST"),
        ("/captions/tags", caption_tags, "GET"),
        *((f"/captions/{a}", _caption_post(a), "POST") for a in ("preview", "apply", "undo")),
    ]
    for path, endpoint, method in routes:
        app.add_api_route(PREFIX + path, endpoint, methods=[method], dependencies=deps, response_model=None,
                          tags=["sd-webui-trainer"])
