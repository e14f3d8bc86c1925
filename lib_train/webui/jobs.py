"""Training jobs inside the WebUI: one at a time, on the loaded checkpoint, reported through ``shared.state``.

A job is created from a config (the same schema as a config file; ``model.checkpoint`` is ignored: the loaded
checkpoint is trained) — everything that can be checked before any model work is checked then, so a bad request
fails at once with the setting or file named — and then run:

- by :meth:`JobManager.start` on a thread of its own that waits for the WebUI's ``queue_lock`` (no generation and
  no checkpoint change while it trains) and opens/closes ``shared.state`` and a progress task itself (the API), or
- by :meth:`JobManager.run` in the caller's thread when the caller already holds both (a Gradio click wrapped in
  ``modules.call_queue.wrap_gradio_gpu_call``).

During a run, events update the job's status (state, step, total, loss, learning rates, ETA, saved files, error
text; :func:`record_progress`) and
``shared.state`` (``job_count``/``job_no`` = steps, ``textinfo``), so the WebUI's progress bar and ``/internal/progress``
follow it; the WebUI's Interrupt (``shared.state.interrupted``) or :meth:`JobManager.interrupt` stops it after the
current step, saving the file and the resume state. Outputs default to a folder per run under the method's WebUI
folder (LoRA: ``--lora-dir``, default ``models/Lora``; embeddings: ``--embeddings-dir``, default ``embeddings``), and
the WebUI's list is refreshed after each save (Lora list rescan; embeddings database ``force_reload``) so new files
show in the cards at once. What runs each method is its record in :mod:`lib_train.methods`; the WebUI's own part of
each (its folder, its list refresh) is the :data:`METHODS` table, keyed by the same names.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import config as config_mod
from .. import methods
from ..atomic import check_output_name, is_within
from ..config import TrainConfig, apply_family_defaults, from_dict, given_keys, shape_problems, validate
from ..data.dataset import confined_to
from ..errors import ConfigError, Problem, TrainerError
from ..methods import Method
from ..models.families import get_family
from ..train import sampling
from ..train.events import Commands, Events, Progress
from ..train.lock import output_lock, refuse_if_held
from ..train.lr_history import LRHistory
from ..train.outputs import existing_final, save_run_config
from ..train.prepare import PreparedData
from ..train.state import LoadedState, load_state, state_dir_for
from ..train.storage import check_writable

ACTIVE_STATES = ("queued", "running")
LOSS_POINTS = 1000  # the loss curve keeps at most this many points (every other one is dropped when it is full)


@dataclass
class JobStatus:
    """What a client sees of a job (``GET /trainer/v1/jobs/{id}``); times are Unix seconds, durations seconds."""

    id: str
    method: str
    name: str
    output_dir: str
    state: str = "queued"  # queued → running → finished | interrupted | error
    phase: str = ""  # the trainer's last status line ("Caching latents 4/4", "Training: 20 steps")
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None  # mean loss of the last logging interval
    lr: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    saved: list[str] = field(default_factory=list)  # model files written, in order
    final_file: str | None = None  # the run's last file (final, or the one saved on interrupt)
    state_dir: str | None = None  # resume state, once written
    error: str = ""
    notes: list[str] = field(default_factory=list)  # warnings and adjustments the user should know about
    samples: list[str] = field(default_factory=list)  # the newest set of sample images (``[sample]`` settings)
    sample_step: int | None = None  # the step the newest samples were made at
    loss_history: list[list[float]] = field(default_factory=list)  # [step, loss] pairs, thinned to ≤ LOSS_POINTS
    # the learning rate of each step: rows [step, one value per lr_series] (a value is None where not finite), thinned
    # to ≤ lr_history.LR_POINTS at a uniform stride, the newest step always kept; lr_series: each parameter group's
    # scheduled rate ("UNet", "Text encoder", "Embedding vectors") and, for DAdaptation/Prodigy, its effective rate
    # d·lr ("UNet d·lr"); lr_note: one line on the newest rates (an adaptive optimizer: what it settled on)
    lr_series: list[str] = field(default_factory=list)
    lr_history: list[list[float | None]] = field(default_factory=list)
    lr_note: str = ""
    resumed_from: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None


@dataclass(frozen=True)
class WebUIMethod:
    """The WebUI's part of one training method (the rest is its :class:`lib_train.methods.Method`)."""

    output_root: Callable[[], str]  # the WebUI folder its files go to by default (a run gets a subfolder)
    refresh: Callable[[], None]  # make the WebUI list new files
    name_conflict: Callable[[TrainConfig], str | None] = lambda cfg: None  # why the run's name clashes, or None
    before_grid: Callable[[list[str]], None] = lambda stems: None  # make the WebUI know these files (grid cells)


def lora_dir() -> str:
    """The built-in Lora extension's folder (``--lora-dir``, default ``models/Lora``)."""
    from modules import paths, shared

    return getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")


def drop_conditioning_caches() -> None:
    """Empty the WebUI's prompt-conditioning caches. They are keyed by prompt text and extra-network tags, not by
    the files those name, so a prompt generated before a run (``<lora:NAME:1>`` of a file that did not exist yet, or
    an embedding's name) would get its old conditioning back afterwards (with "persistent cond cache" on, the WebUI's
    default)."""
    from modules import processing

    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]


def refresh_lora_list() -> None:
    """Rescan the Lora folder, so new files show in the Lora cards and ``<lora:…>`` tags find them."""
    from .model import lora_extension

    networks = lora_extension()
    if networks is not None:
        networks.list_available_networks()
    drop_conditioning_caches()


def embeddings_dir() -> str:
    """The WebUI's embeddings folder (``--embeddings-dir``, default ``embeddings``): it loads every embedding file
    below it, subfolders included, named by its file stem."""
    from modules import paths, shared

    return getattr(shared.cmd_opts, "embeddings_dir", None) or os.path.join(paths.data_path, "embeddings")


def refresh_embeddings() -> None:
    """Reload the WebUI's embeddings database, so new files show in the Textual Inversion cards and prompts."""
    from modules import sd_hijack

    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    drop_conditioning_caches()


def embedding_name_conflict(cfg: TrainConfig) -> str | None:
    """The WebUI names an embedding by its file stem, one per name: another loaded file named like this run's final
    file would make prompts get either of them."""
    from modules import sd_hijack

    other = sd_hijack.model_hijack.embedding_db.word_embeddings.get(cfg.output.name)
    path = getattr(other, "filename", None)
    if not path or Path(path).resolve().parent == Path(cfg.output.output_dir).resolve():
        return None
    return (f"an embedding named '{cfg.output.name}' is already loaded from {path}; the WebUI knows one embedding "
            "per name, so prompts could get either file. Choose another name, or move or rename that file")


def load_embeddings_for_grid(stems: list[str]) -> None:
    """Embeddings in sub-folders are not noticed by the WebUI's change check: reload when one is unknown, and say
    so when the loaded model skipped them (made for another model family)."""
    from modules import sd_hijack

    db = sd_hijack.model_hijack.embedding_db
    if any(s not in db.word_embeddings for s in stems):
        db.load_textual_inversion_embeddings(force_reload=True)
    skipped = [s for s in stems if s in db.skipped_embeddings]
    if skipped:
        raise TrainerError(f"run: the loaded checkpoint cannot use {', '.join(skipped)} (an embedding made for "
                           "another model family); load the checkpoint the run was trained on")


# config ``method`` (:data:`lib_train.methods.METHODS`) → the WebUI's part of it. A method missing here is refused
# with a clear message.
METHODS: dict[str, WebUIMethod] = {
    "lora": WebUIMethod(output_root=lora_dir, refresh=refresh_lora_list),
    "embedding": WebUIMethod(output_root=embeddings_dir, refresh=refresh_embeddings,
                             name_conflict=embedding_name_conflict, before_grid=load_embeddings_for_grid),
}


def folder_policy_problems(cfg: TrainConfig, *, data_root: str, output_root: str) -> list[Problem]:
    """On a shared WebUI (``--hide-ui-dir-config``: its owner does not let users name server folders) a run may only
    read datasets from the upload folder and write (or continue from) files in the method's WebUI folder; the
    problems of ``cfg`` against that rule, each naming the setting."""
    rule = "this WebUI runs with --hide-ui-dir-config, so only folders under {} can be used"
    checks = [("data.train_dir", cfg.data.train_dir, data_root), ("data.reg_dir", cfg.data.reg_dir, data_root),
              ("output.output_dir", cfg.output.output_dir, output_root),
              ("network.init_from", cfg.network.init_from, output_root),
              ("embedding.init_from", cfg.embedding.init_from, output_root)]
    if cfg.embedding.template not in config_mod.TEMPLATES:  # a template file
        checks.append(("embedding.template", cfg.embedding.template, data_root))
    return [Problem(key, rule.format(root)) for key, value, root in checks
            if value and not is_within(value, [root])]


def restricted_roots() -> dict[str, str] | None:
    """``{"data": upload folder, "lora": Lora folder, "embedding": embeddings folder}`` when the WebUI runs with
    ``--hide-ui-dir-config``; None when users may name any folder."""
    from modules import shared

    if not getattr(shared.cmd_opts, "hide_ui_dir_config", False):
        return None
    from .preprocess import upload_root

    return {"data": upload_root(), "lora": lora_dir(), "embedding": embeddings_dir()}


class JobConflict(TrainerError):
    """Another job is queued or running."""


class WebUICommands(Commands):
    """Stops also when the WebUI's Interrupt sets ``shared.state.interrupted`` (only while the job owns the state)."""

    def stop_requested(self) -> bool:
        from modules import shared

        return self.stop_requested_here() or bool(shared.state.interrupted)

    def stop_requested_here(self) -> bool:
        return super().stop_requested()


class Job:
    def __init__(self, cfg: TrainConfig, prep: PreparedData, method: Method, resume: LoadedState | None,
                 resumed_from: str | None, notes: list[str], family: str | None = None):
        self.cfg, self.prep, self.method, self.resume = cfg, prep, method, resume
        self.family = family  # the loaded model's family name when the job was created
        self.webui = METHODS[method.name]
        self.commands = WebUICommands()
        job_id = uuid.uuid4().hex[:12]
        self.status = JobStatus(id=job_id, method=cfg.method, name=cfg.output.name,
                                output_dir=str(Path(cfg.output.output_dir).resolve()),
                                total_steps=prep.total_steps, total_epochs=prep.total_epochs, notes=list(notes),
                                resumed_from=resumed_from,
                                step=resume.state.step if resume else 0)
        self.start_step = self.status.step  # where this session of the run starts (a resumed run: its saved step)
        self.task_id = f"task(trainer-{job_id})"  # the id the WebUI's progress API knows it by
        self.thread: threading.Thread | None = None
        self.lr_history: LRHistory | None = None  # the run's rates, as the last progress event had them

    def snapshot(self) -> dict[str, Any]:
        return dataclasses.asdict(self.status)

    def release(self) -> None:
        """Drop what only a run needs (the dataset plan, a loaded resume state) once the job has ended."""
        self.prep = self.resume = None


class _JobEvents(Events):
    """Trainer events → the job's status and ``shared.state``."""

    def __init__(self, job: Job):
        self.job = job

    def status(self, text: str) -> None:
        from modules import shared

        self.job.status.phase = text
        shared.state.textinfo = text

    def progress(self, p: Progress) -> None:
        from modules import shared

        record_progress(self.job.status, p)
        self.job.lr_history = p.lr_history
        shared.state.job_count = p.total_steps
        shared.state.job_no = p.step
        loss = f", loss {p.loss:.4f}" if p.loss is not None else ""
        shared.state.textinfo = f"Training step {p.step}/{p.total_steps}, epoch {p.epoch}/{p.total_epochs}{loss}"

    def saved(self, path: str, kind: str) -> None:
        s = self.job.status
        if kind == "state":
            s.state_dir = path
            return
        if path not in s.saved:
            s.saved.append(path)
        s.final_file = path
        self.job.webui.refresh()

    def warning(self, text: str) -> None:
        self.job.status.notes.append(text)

    def sampled(self, paths: list[str], step: int) -> None:
        self.job.status.samples, self.job.status.sample_step = list(paths), step


def record_progress(s: JobStatus, p: Progress) -> None:
    """A step's progress into a job's status: position, loss (and its curve), learning rates (and their chart)."""
    s.step, s.total_steps, s.epoch, s.total_epochs = p.step, p.total_steps, p.epoch, p.total_epochs
    s.loss, s.lr, s.eta_s, s.elapsed_s = p.loss, p.lr, p.eta, p.elapsed
    if p.loss is not None and (not s.loss_history or s.loss_history[-1][0] < p.step):
        s.loss_history.append([p.step, p.loss])
        if len(s.loss_history) > LOSS_POINTS:
            s.loss_history[:] = s.loss_history[::2]
    if p.lr_history is not None:  # a new list each time: a status snapshot never sees one being changed
        s.lr_series, s.lr_history = list(p.lr_history.series), p.lr_history.points()
        s.lr_note = p.lr_history.summary(finished=False)


def record_end(s: JobStatus, history: LRHistory | None) -> None:
    """The learning-rate line of a job that ended (``s.state`` set): what an adaptive optimizer settled on."""
    if history is not None and s.step:
        s.lr_note = history.summary(finished=s.state == "finished")


class JobManager:
    """Creates and runs jobs, one at a time, and keeps their status for this WebUI session."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    # ---- queries
    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        """Every job of this session, newest first."""
        return sorted(self._jobs.values(), key=lambda j: j.status.created_at, reverse=True)

    def active(self) -> Job | None:
        return next((j for j in self._jobs.values() if j.status.state in ACTIVE_STATES), None)

    def measured_rate(self):
        """The training speed of the newest job of this session that trained at least 3 steps (for the tab's time
        estimate), as a :class:`~lib_train.estimate.MeasuredRate`; None before one."""
        from ..estimate import rate_from_run

        for job in self.jobs():
            s = job.status
            steps = s.step - job.start_step
            if s.state not in ACTIVE_STATES and steps >= 3 and s.elapsed_s:
                c = job.cfg
                return rate_from_run(c.data.resolution, c.train.batch_size, c.optim.grad_accum, steps, s.elapsed_s,
                                     s.name, family=job.family)
        return None

    # ---- creation
    def create(self, data: dict[str, Any] | None = None, *, resume_dir: str | None = None) -> Job:
        """A checked, prepared job from a config dict, or from a resume-state folder (its saved config).

        Raises :class:`ConfigError` naming each bad setting, :class:`~lib_train.errors.DatasetError` naming each bad
        file, :class:`JobConflict` while another job is active, :class:`TrainerError` when the loaded checkpoint or
        the WebUI's mode cannot be trained.
        """
        from .host import inspect_host

        self._refuse_if_busy()
        roots = restricted_roots()
        if resume_dir and roots is not None and not is_within(resume_dir, roots.values()):
            raise ConfigError([Problem("resume_dir", f"this WebUI runs with --hide-ui-dir-config: resume states "
                                                     f"can only be read from {', '.join(roots.values())}")])
        resume = None
        if resume_dir:
            resume = load_state(resume_dir)
        cfg = from_dict(resume.state.config if resume else (data or {}))
        shape = shape_problems(cfg)  # NaN, NUL bytes, over-long names and paths: before any path is looked at
        if shape:
            raise ConfigError(shape)
        named = cfg.method if isinstance(cfg.method, str) else ""
        webui = METHODS.get(named)
        if webui is None and named in methods.METHODS:
            raise ConfigError([Problem("method", f"'{cfg.method}' training is not available in the WebUI yet; use "
                                                 f"the command line: python -m lib_train {cfg.method} ...")])
        notes = self._settle_paths(cfg, webui) + (resume.notes if resume else [])
        if roots is not None and webui is not None:
            problems = folder_policy_problems(cfg, data_root=roots["data"], output_root=webui.output_root())
            if problems:
                raise ConfigError(problems)
        validate(cfg, headless=False)  # an unknown method is reported here
        final = existing_final(cfg) if resume is None else None
        if final is not None:
            raise ConfigError([Problem("output.name", f"{final} already exists; choose another name, delete the "
                                                      "file, or set output.overwrite to replace it")])
        try:  # a read-only or unwritable output folder is refused now, not after the model work
            check_writable(cfg.output.output_dir)
        except TrainerError as e:
            raise ConfigError([Problem("output.output_dir", str(e))]) from None
        refuse_if_held(cfg.output.output_dir, cfg.output.name)  # another run (here or headless) writes this name
        conflict = webui.name_conflict(cfg) if resume is None else None
        if conflict:
            raise ConfigError([Problem("output.name", conflict)])
        if sampling.enabled(cfg):
            from .sampling import sampler_problems

            problems = sampler_problems(cfg)  # sample.sampler and each prompt line's --ss
            if problems:
                raise ConfigError(problems)
        report = inspect_host()
        if not report.supported:
            raise TrainerError(report.reason)
        method = methods.get(cfg.method)
        # the family's own defaults where the request did not set them (SDXL: gradient checkpointing on)
        notes += apply_family_defaults(cfg, get_family(report.family),
                                       given_keys(resume.state.config if resume else (data or {})))
        with confined_to(None if roots is None else [roots["data"]]):  # links out of the upload folder: refused
            prep = method.entry("prepare")(cfg)
        job = Job(cfg, prep, method, resume, str(Path(resume_dir).resolve()) if resume_dir else None, notes,
                  report.family)
        if resume is not None:  # the loss curve goes on from the interrupted job's (when it ran in this session)
            state_dir = state_dir_for(cfg.output.output_dir, cfg.output.name).resolve()
            before = next((j for j in self.jobs() if j.status.state_dir
                           and Path(j.status.state_dir).resolve() == state_dir), None)
            if before is not None:
                job.status.loss_history = [p for p in before.status.loss_history if p[0] <= job.status.step]
        with self._lock:
            self._refuse_if_busy()
            self._jobs[job.status.id] = job
        return job

    def _refuse_if_busy(self) -> None:
        active = self.active()
        if active is not None:
            raise JobConflict(f"Training job {active.status.id} ('{active.status.name}') is {active.status.state}; "
                              "wait for it to end or interrupt it first.")

    @staticmethod
    def _settle_paths(cfg: TrainConfig, webui: WebUIMethod | None) -> list[str]:
        """Drop ``model.checkpoint`` (the loaded checkpoint is trained) and default ``output.output_dir`` to a
        subfolder named after the run in the method's WebUI folder."""
        notes = []
        if cfg.model.checkpoint:
            notes.append(f"model.checkpoint ({cfg.model.checkpoint}) is ignored in the WebUI: the loaded checkpoint "
                         "is trained.")
            cfg.model.checkpoint = ""
        if not cfg.output.output_dir and webui is not None:
            root = webui.output_root()
            name_ok = check_output_name(cfg.output.name) is None
            cfg.output.output_dir = os.path.join(root, cfg.output.name) if name_ok else root
        return notes

    # ---- running
    def start(self, job: Job) -> None:
        """Run ``job`` on a thread of its own, queued behind any generation (the API's way)."""
        from modules import progress

        progress.add_task_to_queue(job.task_id)
        job.thread = threading.Thread(target=self._run_queued, args=(job,), name=f"trainer-{job.status.id}",
                                      daemon=True)
        job.thread.start()

    def _run_queued(self, job: Job) -> None:
        from modules import call_queue, progress, shared

        with call_queue.queue_lock:
            if job.commands.stop_requested_here():
                job.status.state, job.status.ended_at = "interrupted", time.time()
                job.status.phase = "Cancelled before it started"
                job.release()
                progress.finish_task(job.task_id)
                return
            shared.state.begin(job=job.task_id)
            progress.start_task(job.task_id)
            try:
                self.run(job)
            finally:
                progress.finish_task(job.task_id)
                shared.state.end()
                shared.state.interrupted = False  # as the WebUI resets it after each queued call
                shared.state.skipped = False
                shared.state.stopping_generation = False

    def run(self, job: Job) -> JobStatus:
        """Run ``job`` in this thread. The caller holds ``queue_lock`` and has begun ``shared.state``."""
        from modules import errors, shared

        from .model import loaded_model_bundle, match_model_precision
        from .sampling import webui_sampler

        s, cfg = job.status, job.cfg
        s.state, s.started_at = "running", time.time()
        shared.state.job_count = job.prep.total_steps
        shared.state.job_no = s.step
        events = _JobEvents(job)
        try:
            note = match_model_precision(cfg)
            if note:
                events.warning(note)
            check_writable(cfg.output.output_dir)
            Path(cfg.output.output_dir).mkdir(parents=True, exist_ok=True)
            with output_lock(cfg.output.output_dir, cfg.output.name, what="a WebUI training job",
                             say=events.warning), loaded_model_bundle(cfg, note=events.warning) as bundle:
                save_run_config(cfg)
                result = job.method.entry("train")(cfg, bundle, job.prep, events=events, commands=job.commands,
                                                   resume=job.resume, sampler=webui_sampler)
            s.state, s.step = result.status, result.step
            s.final_file = result.final_file or s.final_file
            s.state_dir = result.state_dir or s.state_dir
            if result.last_loss is not None:
                s.loss = result.last_loss
            if s.state == "interrupted" and s.state_dir is None:
                s.phase = "Interrupted before the first step; nothing to resume"
            elif s.state == "finished":
                s.phase = f"Finished {s.step} steps"
            elif s.state == "interrupted":
                s.phase = f"Interrupted after step {s.step}; the file and the resume state are saved"
            record_end(s, job.lr_history)
        except TrainerError as e:
            s.state, s.error = "error", str(e)
        except Exception as e:  # noqa: BLE001 - a bug: keep the traceback in the log, the message in the status
            s.state, s.error = "error", f"{type(e).__name__}: {e}"
            errors.report(f"sd-webui-trainer: job {s.id} failed", exc_info=True)
        finally:
            s.ended_at = time.time()  # the WebUI's lists were refreshed after each save (_JobEvents.saved)
            job.release()
        return s

    def interrupt(self, job_id: str) -> Job | None:
        """Ask ``job_id`` to stop after the current step (a queued job is cancelled); None if unknown."""
        job = self._jobs.get(job_id)
        if job is not None and job.status.state in ACTIVE_STATES:
            job.commands.request_stop()
        return job


manager = JobManager()  # the WebUI process's one job manager (API and tab share it)
