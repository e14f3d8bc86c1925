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

When the WebUI runs with ``--api-auth user:password[,user2:password2]`` every route requires HTTP Basic
authentication with one of those pairs, as the WebUI's own API does.
"""

from __future__ import annotations

import dataclasses
import json
from secrets import compare_digest
from typing import Any, List

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from ..errors import ConfigError, DatasetError, TrainerError
from .jobs import manager

PREFIX = "/trainer/v1"


class ConditioningRequest(BaseModel):
    prompts: List[str]
    clip_skip: int = 1
    sizes: List[List[int]] = [[1024, 1024]]  # SDXL: (width, height) of the images the prompts are for
    embedding: str = ""  # SDXL: the name of a loaded embedding to encode the prompts with on both sides


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


def _field_loc(where: str) -> list[str]:
    """``"network.rank (--rank)"`` → ``["body", "network", "rank"]``."""
    return ["body", *where.split(" ", 1)[0].split(".")]


def _job_response(create_kwargs: dict[str, Any]) -> JSONResponse:
    try:
        job = manager.create(**create_kwargs)
    except ConfigError as e:
        return _unprocessable([{"loc": _field_loc(p.where), "msg": p.message, "type": "value_error.config"}
                               for p in e.problems], str(e))
    except DatasetError as e:
        return _unprocessable([{"loc": ["dataset", p.where], "msg": p.message, "type": "value_error.dataset"}
                               for p in e.problems], str(e))
    except TrainerError as e:
        return JSONResponse(status_code=409, content={"detail": str(e)})
    created = job.snapshot()  # as created ("queued"), before the job's thread can change it
    manager.start(job)
    return JSONResponse(created)


async def create_job(request: Request) -> JSONResponse:
    raw = await request.body()
    try:
        data = json.loads(raw.decode("utf-8-sig") or "null")
    except ValueError as e:
        return _unprocessable([{"loc": ["body"], "msg": f"not valid JSON: {e}", "type": "value_error.jsondecode"}],
                              "The request body is not valid JSON.")
    if not isinstance(data, dict):
        return _unprocessable([{"loc": ["body"], "msg": "must be a JSON object of config sections, e.g. "
                                                        '{"data": {"train_dir": ...}, "output": {"name": ...}}',
                                "type": "type_error.dict"}], "The request body must be a JSON object.")
    return await run_in_threadpool(_job_response, {"data": data})


def _job_or_404(job_id: str):
    job = manager.get(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no training job '{job_id}' in this WebUI session")
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


def conditioning_check(req: ConditioningRequest) -> dict[str, Any]:
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

            if not req.sizes or any(len(s) != 2 or min(s) < 64 for s in req.sizes):
                raise HTTPException(status_code=422, detail="sizes: give [width, height] pairs of at least 64 px")
            sizes = [(int(w), int(h)) for w, h in req.sizes]
            try:
                results = compare_sdxl_conditioning(model, req.prompts, sizes, req.clip_skip, req.embedding)
            except TrainerError as e:
                raise HTTPException(status_code=422, detail=str(e)) from None
        elif req.embedding:
            raise HTTPException(status_code=422, detail="embedding: only for an SDXL checkpoint (SD1/SD2 embeddings "
                                                        "are compared by tests/webui/test_embedding_webui.py)")
        else:
            results = compare_conditioning(model, family, req.prompts, req.clip_skip)
        return {"family": family, "clip_skip": req.clip_skip, "results": results}


def register_routes(_demo: Any, app: FastAPI) -> None:
    """``on_app_started`` callback: add every route of this module to the WebUI's app."""
    from modules import shared

    from .preprocess import preprocess_route

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
        ("/diagnostics/conditioning", conditioning_check, "POST"),
        ("/preprocess", preprocess_route, "POST"),
    ]
    for path, endpoint, method in routes:
        app.add_api_route(PREFIX + path, endpoint, methods=[method], dependencies=deps, response_model=None,
                          tags=["sd-webui-trainer"])
