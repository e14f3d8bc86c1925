"""The training run every method shares: set-up, the loop, saves, samples, resume, restore.

:func:`run_training` takes a method's :class:`~lib_train.train.session.TrainingSession` and does the rest, in this
order: attach (reversible) → gradient checkpointing → optimizer and schedule → cache latents → cache text outputs
(where the session's texts are static: no text encoder trains, captions unchanging) → on a GPU, the VAE and cached
text encoders to the CPU → loop → atomic saves → detach. However the run ends (finished, interrupted, error, out of
memory) the host model is restored exactly: attachments removed, flags and hooks as before
(:class:`~lib_train.models.guard.ModelGuard`), every parameter and buffer on its device
(:class:`~lib_train.train.placement.Placement`).

Each sample of a micro-batch is conditioned on its caption and, for families with size conditioning (SDXL), on its
image's sizes (:meth:`~lib_train.train.prepare.PreparedData.image_size`, kohya's rule); the bundle decides what it
needs (:meth:`~lib_train.models.bundle.ModelBundle.condition`).

The loop (:func:`_loop`) reads top to bottom: a micro-batch's forward and backward; every ``grad_accum``
micro-batches (and at the end of an epoch) an optimizer step; then one line per decision — log, samples, saves,
stop, save request, end of epoch. Each decision is a pure function of the config and the :class:`Point` the run is
at after the step.

Exact resume: all randomness of micro-batch ``i`` comes from ``step_seed(seed, i)`` and the sample seeds of the
epoch plan (seeded by (seed, epoch)), so a run resumed at (epoch, batch) draws what the uninterrupted run would.

Speed (issue 13): the run's speed switches (:mod:`~lib_train.train.speed`: regional ``torch.compile``, channels-last,
fused AdamW, background image prefetch) are planned with the optimizer and applied to the UNet for the loop only,
removed however it ends. The steps never wait for the device except once per optimizer step, when the step's summed
loss is read back (:class:`_MeanLoss`): that read is the divergence check and the logged value. Inputs go to the
device as asynchronous copies (noise and timesteps are drawn on the CPU, cached latents are pinned), and a save
checks its tensors with one read per device (:func:`all_finite`).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import warnings
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import TrainConfig, label
from ..data import Sample, plan_epoch
from ..errors import TrainerError
from ..models.guard import ModelGuard
from ..models.load import resolve_precision
from . import loss as L
from . import sampling, storage
from .checkpointing import GradientCheckpointing
from .events import Commands, Events, Progress
from .lock import output_lock
from .oom import out_of_memory_message
from .lr_history import LRHistory, read_rates
from .optim import build_optimizer, parse_optimizer_args, resolve_optimizer
from .outputs import check_final_free, final_paths
from .placement import Placement, on_device
from .prepare import PreparedData
from .sampling import SampleContext, Sampler, ddim_sampler
from .schedule import make_scheduler
from .session import SAVE_DTYPES, RunInfo, TrainingSession
from .speed import ChannelsLast, RegionalCompile, SpeedPlan, plan_speed
from .state import RunState, save_state, state_dir_for


@dataclass
class RunResult:
    status: str  # "finished" | "interrupted"
    step: int
    total_steps: int
    saved: list[str] = field(default_factory=list)
    final_file: str | None = None
    state_dir: str | None = None
    last_loss: float | None = None
    notes: list[str] = field(default_factory=list)


# ---- decisions after an optimizer step

@dataclass(frozen=True)
class Point:
    """Where a run is right after an optimizer step."""

    step: int  # optimizer steps done
    epoch: int  # the 1-based epoch the step belongs to
    epoch_end: bool  # the step ended its epoch
    final: bool  # the run's last step (``step >= total_steps``)


def log_due(at: Point, every: int, total_steps: int) -> bool:
    """Read the mean loss (a GPU sync) every ``every`` steps and at the last one."""
    return at.step % every == 0 or at.step == total_steps


def samples_due(cfg: TrainConfig, at: Point) -> bool:
    """A sample set every ``sample.every_steps`` steps, and after the last step."""
    return sampling.due(cfg, at.step) or (at.final and sampling.due(cfg, at.step, final=True))


def step_save_due(cfg: TrainConfig, at: Point) -> bool:
    """A ``step`` file every ``output.save_every_steps`` steps (the last step writes the final file instead)."""
    n = cfg.output.save_every_steps
    return bool(n) and at.step % n == 0 and not at.final


def epoch_samples_due(cfg: TrainConfig, at: Point) -> bool:
    """A sample set after every ``sample.every_epochs`` epochs (the run's end has its own)."""
    return at.epoch_end and not at.final and sampling.due(cfg, at.step, epoch_end=at.epoch)


def epoch_save_due(cfg: TrainConfig, at: Point, total_epochs: int) -> bool:
    """An ``epoch`` file after every ``output.save_every_epochs`` epochs but the last."""
    return _every_epochs(cfg.output.save_every_epochs, at, total_epochs)


def state_save_due(cfg: TrainConfig, at: Point, total_epochs: int) -> bool:
    """The resume state after every ``output.save_state_every_epochs`` epochs but the last."""
    return _every_epochs(cfg.output.save_state_every_epochs, at, total_epochs)


def _every_epochs(n: int, at: Point, total_epochs: int) -> bool:
    return at.epoch_end and not at.final and bool(n) and at.epoch % n == 0 and at.epoch < total_epochs


# ---- micro-batches, steps, precision

@dataclass(frozen=True)
class MicroBatch:
    epoch: int  # 0-based
    k: int  # position in the epoch's plan
    count: int  # micro-batches in the epoch
    samples: list[Sample]
    index: int  # micro-batch number in the run (its seed)

    def ends_step(self, accum: int) -> bool:
        """The optimizer steps after this micro-batch: every ``accum`` of them, and at the end of the epoch."""
        return (self.k + 1) % accum == 0 or self.epoch_end

    @property
    def epoch_end(self) -> bool:
        return self.k + 1 == self.count

    @property
    def next(self) -> tuple[int, int]:
        """(epoch, batch) of the next micro-batch: where a resumed run starts."""
        return (self.epoch, self.k + 1) if self.k + 1 < self.count else (self.epoch + 1, 0)


def micro_batches(cfg: TrainConfig, prep: PreparedData, epoch: int = 0, batch: int = 0) -> Iterator[MicroBatch]:
    """The run's micro-batches from (``epoch``, ``batch``) on, epoch plans drawn from (seed, epoch)."""
    for e in range(epoch, prep.total_epochs):
        plan = plan_epoch(prep.entries, batch_size=cfg.train.batch_size, seed=cfg.train.seed, epoch=e,
                          flip_aug=cfg.data.flip)
        for k in range(batch if e == epoch else 0, len(plan)):
            yield MicroBatch(e, k, len(plan), plan[k], e * prep.batches_per_epoch + k)


def step_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for micro-batch ``index`` of the run (same in every process)."""
    h = hashlib.sha256(f"lib_train.step/{seed}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def autocast_dtype(setting: str, device: torch.device, events: Events) -> torch.dtype | None:
    """The autocast dtype for ``train.mixed_precision`` (:func:`~lib_train.models.load.resolve_precision`), or None
    for fp32; warns when a half precision was asked for where there is no GPU."""
    if device.type != "cuda" and setting in ("fp16", "bf16"):
        events.warning(f"mixed precision {setting} needs a GPU; training in fp32 on {device.type}")
    return resolve_precision(setting, device)


def make_scaler(enabled: bool):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3 (the WebUI's default torch 2.1)


def _oom_types() -> tuple[type[BaseException], ...]:
    t = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (t,) if t else ()


class Stopped(Exception):
    """A stop was requested before training started (during latent caching)."""


@dataclass
class Optim:
    """Optimizer, schedule and grad scaler of a run."""

    name: str  # the optimizer used (after a fallback)
    optimizer: Any
    scheduler: Any
    scaler: Any

    def __post_init__(self) -> None:
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self, max_grad_norm: float) -> None:
        """One step from the accumulated gradients (when any micro-batch reached the parameters), the schedule's
        step, gradients cleared."""
        stepped = any(p.grad is not None for p in self.params)
        if stepped:
            if max_grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with warnings.catch_warnings():
            if not stepped:  # torch warns when a schedule steps before its optimizer ever has
                warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class _Clock:
    """Elapsed time of the session and an ETA from the recent step rate."""

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=20)
        self.start = self.last = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self, steps_left: int) -> float | None:
        rate = (sum(self.times) / len(self.times)) if self.times else None
        return rate * steps_left if rate else None


class _MeanLoss:
    """The losses of a step's micro-batches, summed on the device and read back once per step (:meth:`read`: the
    loop's one host-device synchronisation, which is also its finiteness check); the mean since the last
    :meth:`take` is kept on the host."""

    def __init__(self) -> None:
        self.step_sum: torch.Tensor | None = None
        self.step_n = 0
        self.total, self.n = 0.0, 0

    def add(self, loss: torch.Tensor) -> None:
        self.step_sum = loss if self.step_sum is None else self.step_sum + loss
        self.step_n += 1

    def read(self) -> float | None:
        """The step's mean loss (one read from the device); None when no micro-batch was added."""
        if self.step_sum is None:
            return None
        value = self.step_sum.item() / self.step_n
        self.total += value * self.step_n
        self.n += self.step_n
        self.step_sum, self.step_n = None, 0
        return value

    def take(self) -> float | None:
        """The mean of the micro-batches read since the last take."""
        value = self.total / self.n if self.n else None
        self.total, self.n = 0.0, 0
        return value


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor of ``tensors`` is finite, with one read from each device (not one per
    tensor)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


class SaveFault(Exception):
    """Writing into the output folder failed (or would: too little room); the run stops and rescues its weights
    (:meth:`Run.rescue`)."""

    def __init__(self, folder: Path, error: OSError, model: tuple[str, int, bool] | None):
        super().__init__(str(error))
        self.folder, self.error = folder, error
        self.model = model  # (stem, epoch, finished) of a model file not written; None: the state failed


# ---- the run

class Run:
    """The state of one session of a run and what it does between steps: saves, resume state, samples."""

    def __init__(self, session: TrainingSession, events: Events, commands: Commands, sampler: Sampler):
        self.session, self.events, self.commands, self.sampler = session, events, commands, sampler
        self.cfg, self.prep, self.resume = session.cfg, session.prep, session.resume
        self.step = self.resume.state.step if self.resume else 0
        self.saved: list[str] = list(self.resume.state.saved) if self.resume else []
        self.notes: list[str] = []
        self.loss: float | None = None
        self.info: RunInfo | None = None
        self.autocast: torch.dtype | None = None  # the run's autocast dtype
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}  # cached latents, on the CPU (pinned on CUDA)
        self.speed = SpeedPlan()  # the run's speed switches (:func:`make_optim` plans them)
        self.last_save: tuple[str, int, str] | None = None  # (stem, step, path): a stem is written once per step
        self.last_samples: tuple[int, list[Path]] | None = None  # (step, paths) of the newest sample set
        self.parked_text_encoders = False  # the text encoders wait on the CPU (their outputs are cached)
        self.sampling_failed = False  # a sampler failure turns samples off for this session (not in the config:
        # the resume state keeps the settings, and a resumed run tries again)
        self.state_step = self.resume.state.step if self.resume else None  # step of the newest resume state
        # the rates of every step (a resumed run goes on with its history); the session's saves write them
        self.lr_history = (LRHistory.from_json(self.resume.state.lr_history) if self.resume else None) or LRHistory()
        session.lr_history = self.lr_history

    def warn(self, text: str) -> None:
        """A warning that is also kept in the result's notes."""
        self.events.warning(text)
        self.notes.append(text)

    def result(self, status: str, final_file: str | None = None, state_dir: str | None = None) -> RunResult:
        return RunResult(status, self.step, self.prep.total_steps, self.saved, final_file, state_dir, self.loss,
                         self.notes)

    def save(self, stem_pattern: str, kind: str, epoch: int, finished: bool = False) -> str:
        """The method's file(s) under ``stem_pattern`` (formatted with name, step, epoch) and the preview image;
        returns the model file. Raises :class:`TrainerError` when the trained tensors are not finite (nothing is
        written), :class:`SaveFault` when the output folder cannot take the file."""
        stem = stem_pattern.format(name=self.session.name, step=self.step, epoch=epoch)
        if self.last_save is not None and self.last_save[:2] == (stem, self.step):
            return self.last_save[2]
        tensors = self.session.state_tensors()
        self.check_finite(tensors)
        try:
            paths = self.write_model(stem, epoch, finished, tensors)
        except OSError as e:
            raise SaveFault(self.session.out_dir, e, (stem, epoch, finished)) from None
        self.record(paths, kind)
        self.write_preview(paths[0])
        self.last_save = (stem, self.step, paths[0])
        return paths[0]

    def write_model(self, stem: str, epoch: int, finished: bool, tensors: dict[str, torch.Tensor]) -> list[str]:
        """:meth:`TrainingSession.save_model` after checking the room it needs (``tensors``: the trained ones)."""
        storage.ensure_space(self.session.out_dir, self.model_bytes(tensors), f"the {self.session.noun} file")
        return self.session.save_model(stem, epoch=epoch, step=self.step, finished=finished)

    def record(self, paths: list[str], kind: str) -> None:
        for path in paths:
            if path not in self.saved:
                self.saved.append(path)
            self.events.saved(path, kind)

    def model_bytes(self, tensors: dict[str, torch.Tensor]) -> int:
        """About the room one save of the method's file(s) takes (``tensors``: the trained ones)."""
        one = storage.tensor_bytes(tensors, SAVE_DTYPES[self.cfg.output.save_precision])
        return one * len(final_paths(self.cfg)) + storage.SAVE_MARGIN

    def state_bytes(self, optim: Optim, tensors: dict[str, torch.Tensor]) -> int:
        """About the room the resume state takes (the trained tensors in fp32 and the optimizer's state; before the
        first step, two moments per tensor are assumed)."""
        weights = storage.tensor_bytes(tensors)
        moments = storage.tensor_bytes(t for st in optim.optimizer.state.values() for t in st.values()
                                       if isinstance(t, torch.Tensor))
        return weights + (moments or 2 * weights) + storage.SAVE_MARGIN

    def save_state(self, optim: Optim, epoch: int, batch: int, directory: Path | None = None) -> Path:
        """The resume state; the next run starts at micro-batch ``batch`` of ``epoch``. Checked finite first (a state
        that would resume into NaN is never written); :class:`SaveFault` when the folder cannot take it."""
        info, s = self.info, self.session
        directory = directory or s.state_dir
        tensors = s.state_tensors()
        self.check_finite(tensors, optim)
        state = RunState(step=self.step, epoch=epoch, batch=batch, config=self.cfg.to_dict(),
                         session_id=info.session_id, started_at=info.started_at, optimizer=info.optimizer,
                         dataset_fingerprint=self.prep.fingerprint, saved=list(self.saved),
                         lr_history=self.lr_history.to_json())
        scaler = optim.scaler
        try:
            storage.ensure_space(directory.parent, self.state_bytes(optim, tensors), "the resume state")
            save_state(directory, state, tensors, optim.optimizer.state_dict(),
                       optim.scheduler.state_dict(), scaler.state_dict() if scaler.is_enabled() else None)
        except OSError as e:
            raise SaveFault(directory.parent, e, None) from None
        self.state_step = self.step
        self.events.saved(str(directory), "state")
        return directory

    # ---- divergence
    def check_finite(self, tensors: dict[str, torch.Tensor], optim: Optim | None = None) -> None:
        """Raise the divergence error when a trained tensor (``tensors``: :meth:`TrainingSession.state_tensors`) or,
        with ``optim``, an optimizer state tensor is not finite, or would not be in the save precision."""
        dtype = SAVE_DTYPES[self.cfg.output.save_precision]
        if not all_finite(tensors.values()):  # one read from the device; the names only when something is not
            bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
            raise self.diverged(f"{len(bad)} of the {len(tensors)} trained tensors hold inf/nan ({bad[0]}, ...)")
        if optim is not None and not all_finite(t for st in optim.optimizer.state.values() for t in st.values()):
            raise self.diverged("the optimizer's state holds inf/nan")
        if dtype != torch.float32 and not all_finite(t.to(dtype) for t in tensors.values()):
            big = [k for k, t in tensors.items() if not bool(torch.isfinite(t.to(dtype)).all())]
            if big:
                raise self.diverged(f"{len(big)} of the {len(tensors)} trained tensors ({big[0]}, ...) hold values "
                                    f"too large for {label('output.save_precision')} {self.cfg.output.save_precision}",
                                    also="or save in bf16 or fp32")

    def diverged(self, what: str, also: str = "") -> TrainerError:
        """The message of a run that diverged at ``self.step``: what went non-finite, which settings to lower, the
        last good file (nothing non-finite is ever written)."""
        o, t = self.cfg.optim, self.cfg.train
        settings = [f"{label('optim.lr')} is {o.lr:g}"]
        if getattr(self.session, "train_te", False):
            settings.append(f"{label('optim.te_lr')} is {o.te_lr:g}")
        if not o.max_grad_norm:
            settings.append(f"{label('optim.max_grad_norm')} is 0 (gradient clipping off; 1 keeps single steps "
                            "small)")
        if t.mixed_precision == "fp16":
            settings.append(f"{label('train.mixed_precision')} is fp16")
        return TrainerError(f"Training diverged at step {self.step}: {what}. {self.session.divergence_hint} Now "
                            f"{', '.join(settings)}{f'; {also}' if also else ''}. Nothing with inf/nan was written. "
                            f"{self.kept()}")

    def kept(self) -> str:
        last = self.saved[-1] if self.saved else None
        text = f"The last good file is kept: {last}." if last else "No file was saved before it."
        if self.state_step is not None and (self.session.state_dir / "state.json").is_file():
            text += f" The resume state in {self.session.state_dir} (step {self.state_step}) is from before it."
        return text

    # ---- a failed save
    def rescue(self, fault: SaveFault, optim: Optim, position: tuple[int, int]) -> TrainerError:
        """The output folder failed (``fault``): write what was not written — the model file, and the resume state
        at ``position`` — into the first rescue folder that takes them; the message says where, and what to do."""
        s, e = self.session, fault.error
        head = f"Could not save the {s.noun} into {fault.folder}: {storage.reason(e)}."
        tried = []
        for folder in storage.rescue_folders(s.name, fault.folder):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                model_file = None
                if fault.model is not None:
                    stem, epoch, finished = fault.model
                    out_dir = s.out_dir
                    s.out_dir = folder
                    try:
                        paths = self.write_model(stem, epoch, finished, s.state_tensors())
                    finally:
                        s.out_dir = out_dir
                    self.record(paths, "interrupted")
                    model_file = paths[0]
                state_dir = self.save_state(optim, *position, directory=state_dir_for(folder, s.name))
            except (OSError, SaveFault) as err:
                err = err.error if isinstance(err, SaveFault) else err
                tried.append(f"{folder}: {storage.reason(err)}")
                continue
            where = (f"its {s.noun} at step {self.step} is saved as {model_file} instead" if model_file else
                     f"its {s.noun} at step {self.step} is {self.saved[-1] if self.saved else 'not saved'}")
            return TrainerError(f"{head} The run stopped at step {self.step}/{self.prep.total_steps}; {where}, with "
                                f"the resume state in {state_dir}. {storage.advice(e)}, then resume from "
                                f"{state_dir} (the resumed run writes into {fault.folder} again).")
        return TrainerError(f"{head} The run stopped at step {self.step}/{self.prep.total_steps}, and no other folder "
                            f"could take its {s.noun} either ({'; '.join(tried) or 'none found'}): the weights of "
                            f"this session are lost. {storage.advice(e)}, and set {storage.RESCUE_ENV} to a folder "
                            "on another disk for a fallback.")

    def make_samples(self) -> None:
        """One sample set (``[sample]``), written and reported; a failure is reported and turns sampling off for the
        rest of the session (samples never stop training)."""
        cfg, s = self.cfg, self.session
        if self.sampling_failed or not sampling.enabled(cfg) or (
                self.last_samples and self.last_samples[0] == self.step):
            return
        name_text = s.sample_name_text()
        request = sampling.request_for(cfg, name_text)
        self.events.status(f"Sampling {len(request.prompts)} image(s) at step {self.step}")
        ctx = SampleContext(cfg=cfg, bundle=s.bundle, device=s.device, autocast=self.autocast, name_text=name_text,
                            embedding=s.sample_embedding(), condition=s.condition)
        try:
            with on_device(s.bundle.text_encoder, s.device) if self.parked_text_encoders else nullcontext():
                images = self.sampler(ctx, request)
            paths = sampling.save_samples(s.out_dir, s.name, self.step, images)
        except Exception as e:  # noqa: BLE001 - any sampler failure (out of memory too): report, keep training
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
            self.warn(f"Sample images failed at step {self.step} and are turned off for the rest of this run: "
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            self.sampling_failed = True
            return
        self.last_samples = (self.step, paths)
        self.events.sampled([str(p) for p in paths], self.step)
        self.events.status(f"Training: {self.prep.total_steps} steps")

    def write_preview(self, model_file: str) -> None:
        """``<stem>.preview.png`` from the first image of a sample set made at this step, if there is one."""
        if self.last_samples and self.last_samples[0] == self.step and self.last_samples[1]:
            try:
                sampling.write_preview(model_file, self.last_samples[1][0])
            except OSError as e:
                self.events.warning(f"Could not write the preview image of {model_file}: {e}")


def make_optim(run: Run) -> Optim:
    """The optimizer (or its fallback, with a warning) and schedule over the session's parameters, from the resume
    state when there is one, and the grad scaler of the run's precision (``run.autocast`` is set)."""
    cfg, resume, s = run.cfg, run.resume, run.session
    o = cfg.optim
    args = parse_optimizer_args(o.optimizer_args)
    name = resume.state.optimizer if resume else o.optimizer
    used, note = resolve_optimizer(name, args, s.device, o.allow_fallback)
    if note:
        run.warn(note)
        args = {}
    run.speed = plan_speed(cfg, s.device, latents_cached=cfg.data.cache_latents != "off", optimizer=used)
    for notice in run.speed.notices:
        run.warn(notice)
    optimizer = build_optimizer(used, s.param_groups(), o.lr, args, fused=run.speed.fused)
    scheduler = make_scheduler(optimizer, total_steps=run.prep.total_steps, kind=o.scheduler,
                               warmup_steps=o.warmup_steps, num_cycles=o.num_cycles, power=o.power)
    if resume:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        for group in optimizer.param_groups:  # a state saved by a fused run resumes as this run plans it
            if "fused" in group:
                group["fused"] = optimizer.defaults.get("fused")
    run.autocast = autocast_dtype(cfg.train.mixed_precision, s.device, run.events)
    scaler = make_scaler(run.autocast == torch.float16)
    if resume is not None and resume.scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(resume.scaler)
    return Optim(used, optimizer, scheduler, scaler)


def cache_latents(run: Run) -> None:
    """Encode every (image, flip) the run needs once, through the latent cache (raises :class:`Stopped` when a stop
    is requested meanwhile)."""
    from ..data.latent_cache import LatentCache, load_pixels

    cfg, prep, bundle = run.cfg, run.prep, run.session.bundle
    mode = cfg.data.cache_latents
    if mode == "off":
        return
    cache_dir = run.session.out_dir / ".latent-cache" if mode == "disk" else None
    vae_id = f"{bundle.checkpoint_name}|{bundle.family}|{bundle.vae_compute_dtype}"  # the dtype latents come in
    cache = LatentCache(mode, cache_dir, vae_id)
    flips = (False, True) if cfg.data.flip else (False,)
    todo = [(i, f) for i in range(len(prep.items)) for f in flips]
    run.events.status(f"Caching latents of {len(todo)} images")
    for n, (i, flip) in enumerate(todo):
        if run.commands.stop_requested():
            raise Stopped()
        item, plan = prep.items[i], prep.plans[i]
        key = cache.key_for(item.path, plan.bucket, plan.crop, flip)
        latents = cache.get_or_compute(key, lambda: bundle.encode_pixels(load_pixels(item.path, plan, flip)[None])[0])
        run.latents[(i, flip)] = latents.pin_memory() if run.session.device.type == "cuda" else latents
        if (n + 1) % 10 == 0 or n + 1 == len(todo):
            run.events.status(f"Caching latents {n + 1}/{len(todo)}")


def cache_text(run: Run) -> bool:
    """Encode the session's static texts once (:meth:`TrainingSession.static_texts`), under the run's autocast, as the
    steps would; True when it did (raises :class:`Stopped` when a stop is requested meanwhile)."""
    texts = run.session.static_texts()
    if not texts:
        return False
    run.events.status(f"Caching text encodings of {len(texts)} captions and prompts")
    ctx = torch.autocast(run.session.device.type, dtype=run.autocast) if run.autocast else nullcontext()
    for n in range(0, len(texts), 32):
        if run.commands.stop_requested():
            raise Stopped()
        with ctx:
            run.session.cache_texts(texts[n:n + 32])
    return True


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without waiting for the device: a CPU tensor goes to CUDA from pinned memory, as an
    asynchronous copy (a copy from pageable memory waits for every queued kernel first)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


Pixels = dict  # (item index, flip) → its image as load_pixels returns it (pinned on CUDA)


def load_batch_pixels(run: Run, mb: MicroBatch) -> Pixels:
    """The decoded, resized, cropped and flipped images of ``mb``'s samples whose latents are not cached (what the
    prefetch thread does while a step runs)."""
    from ..data.latent_cache import load_pixels

    cuda = run.session.device.type == "cuda"
    out: Pixels = {}
    for x in mb.samples:
        key = (x.index, x.flip)
        if key not in run.latents and key not in out:
            pixels = load_pixels(run.prep.items[x.index].path, run.prep.plans[x.index], x.flip)
            out[key] = pixels.pin_memory() if cuda else pixels
    return out


def latents_for(run: Run, index: int, flip: bool, pixels: Pixels | None = None) -> torch.Tensor:
    """The latents of an image: cached (on the CPU), or encoded now on the device (from ``pixels`` when the
    prefetch thread loaded them)."""
    cached = run.latents.get((index, flip))
    if cached is not None:
        return cached
    loaded = (pixels or {}).get((index, flip))
    if loaded is None:
        from ..data.latent_cache import load_pixels

        loaded = load_pixels(run.prep.items[index].path, run.prep.plans[index], flip)
    return run.session.bundle.encode_pixels(to_device(loaded, run.session.device)[None])[0]


def micro_step(run: Run, mb: MicroBatch, ac: torch.Tensor, scaler, pixels: Pixels | None = None) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns the (detached) loss, left on the device. A loss that does
    not depend on the trained parameters (e.g. no sample's prompt holds the embedding) is not back-propagated.
    Nothing here waits for the device: the noise and timesteps are drawn on the CPU and copied asynchronously."""
    s, t_cfg = run.session, run.cfg.train
    bundle, device = s.bundle, s.device
    seed = step_seed(t_cfg.seed, mb.index)
    torch.manual_seed(seed)  # dropout, if any
    gen = torch.Generator().manual_seed(seed)
    parts = [latents_for(run, x.index, x.flip, pixels) for x in mb.samples]
    on_cpu = all(p.device.type == "cpu" for p in parts)
    x0_cpu = torch.stack(parts) if on_cpu else None
    x0 = to_device(x0_cpu, device) if on_cpu else torch.stack([to_device(p, device) for p in parts])
    prompts = s.prompts(mb.samples)
    sizes = [run.prep.image_size(x.index, x.flip) for x in mb.samples]  # for families with size conditioning
    noise = to_device(L.make_noise(x0_cpu if on_cpu else x0.new_empty(x0.shape, device="cpu"), gen,
                                   noise_offset=t_cfg.noise_offset), device)  # the same draws on every device
    t = to_device(L.sample_timesteps(len(mb.samples), gen, "cpu"), device)
    x_t = L.add_noise(x0, noise, t, ac)
    with torch.autocast(device.type, dtype=run.autocast) if run.autocast else nullcontext():
        cond = s.condition(prompts, sizes)
        pred = bundle.predict(x_t, t, cond)
    target = L.target_for(x0, noise, t, ac, bundle.prediction)
    weights = L.min_snr_weights(t, ac, t_cfg.min_snr_gamma, bundle.prediction) if t_cfg.min_snr_gamma else None
    loss = L.diffusion_loss(pred, target, weights)
    if loss.requires_grad:
        scaler.scale(loss / run.cfg.optim.grad_accum).backward()
    return loss.detach()


def run_training(session: TrainingSession, *, events: Events, commands: Commands,
                 sampler: Sampler | None = None) -> RunResult:
    """Run ``session`` on its bundle in place. See the module docstring for what is guaranteed about the model.

    The output folder is checked writable and the output name locked for the run (:mod:`~lib_train.train.lock`; the
    caller may hold it already), and what a killed run of the same name left there is cleaned up first."""
    cfg, prep, resume = session.cfg, session.prep, session.resume
    storage.check_writable(session.out_dir)
    session.out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(session.out_dir, session.name, what="a training run", say=events.warning):
        if resume is None:
            check_final_free(cfg)
        for note in storage.clean_stale(session.out_dir, session.name):
            events.warning(note)
        if resume is not None and resume.state.dataset_fingerprint != prep.fingerprint:
            events.warning("The dataset or its bucket settings changed since the run started; the resumed run will "
                           "not match an uninterrupted one.")
        return _run_session(Run(session, events, commands, sampler or ddim_sampler))


def _run_session(run: Run) -> RunResult:
    session, cfg = run.session, run.cfg
    bundle = session.bundle
    guard = ModelGuard(bundle.model)
    placement = Placement(bundle.model)  # the run may move the VAE and text encoders to the CPU
    ckpt: GradientCheckpointing | None = None
    channels_last: ChannelsLast | None = None
    compiled: RegionalCompile | None = None
    try:
        for warning in session.attach():
            run.warn(warning)
        if cfg.train.gradient_checkpointing:
            ckpt = GradientCheckpointing(*session.checkpointed_modules())
        optim = make_optim(run)
        check_room(run, optim)
        state = run.resume.state if run.resume else None
        run.info = (RunInfo(state.session_id, state.started_at, optim.name) if state
                    else RunInfo(random.getrandbits(31), time.time(), optim.name))
        try:
            cache_latents(run)
            texts_cached = cache_text(run)
        except Stopped:
            return run.result("interrupted")
        if session.device.type == "cuda":
            if cfg.train.offload_vae and cfg.data.cache_latents != "off":
                bundle.vae.to("cpu")  # the VAE is not needed any more: free its memory for training
            if texts_cached:
                bundle.text_encoder.to("cpu")  # nor the text encoders (back for sampling, and at the end)
                run.parked_text_encoders = True
            torch.cuda.empty_cache()
        if run.speed.channels_last:
            channels_last = ChannelsLast(bundle.unet)
        if run.speed.compile:
            compiled = RegionalCompile(bundle.unet, run.warn)
        run.events.status(f"Speed switches on: {run.speed.summary()}")
        session.start(run.info)
        return _loop(run, optim)
    except _oom_types() as e:
        raise TrainerError(out_of_memory_message(e, cfg, session.device)) from None
    finally:
        if compiled is not None:
            compiled.remove()
        if channels_last is not None:
            channels_last.restore()
        if ckpt is not None:
            ckpt.remove()
        session.detach()
        guard.restore()
        placement.restore()
        if session.device.type == "cuda":
            torch.cuda.empty_cache()


def planned_saves(run: Run) -> int:
    """How many model saves the rest of the run makes (step and epoch files, the final one)."""
    o, prep = run.cfg.output, run.prep
    done_epochs = run.resume.state.epoch if run.resume else 0
    steps = sum(1 for n in range(run.step + 1, prep.total_steps) if o.save_every_steps and n % o.save_every_steps == 0)
    epochs = sum(1 for e in range(done_epochs + 1, prep.total_epochs)
                 if o.save_every_epochs and e % o.save_every_epochs == 0)
    return steps + epochs + 1


def check_room(run: Run, optim: Optim) -> None:
    """Before the first step: refuse when the output folder cannot even take the final file, warn when it cannot
    take every planned save and a resume state."""
    folder = run.session.out_dir
    free = storage.free_bytes(folder)
    if free is None:
        return
    tensors = run.session.state_tensors()
    one, state, n = run.model_bytes(tensors), run.state_bytes(optim, tensors), planned_saves(run)
    if free < one:
        raise TrainerError(f"The output folder {folder} has only {storage.mb(free)} free; the {run.session.noun} "
                           f"file alone needs about {storage.mb(one)}. Free some space on that disk or choose another "
                           "output folder.")
    if free < n * one + 2 * state:
        run.warn(f"The output folder {folder} has {storage.mb(free)} free; this run's {n} planned save(s) and its "
                 f"resume state need about {storage.mb(n * one + 2 * state)}. Free some space, or save less often "
                 f"({label('output.save_every_steps')}, {label('output.save_every_epochs')}); a save that does not "
                 "fit stops the run and goes to a fallback folder.")


def _loop(run: Run, optim: Optim) -> RunResult:
    start = (run.resume.state.epoch, run.resume.state.batch) if run.resume else (0, 0)
    position = [start]
    try:
        return _steps(run, optim, position)
    except SaveFault as fault:
        raise run.rescue(fault, optim, position[0]) from None


def _steps(run: Run, optim: Optim, position: list[tuple[int, int]]) -> RunResult:
    """The steps; ``position[0]`` follows where a resumed run would start."""
    cfg, prep, s = run.cfg, run.prep, run.session
    batches = micro_batches(cfg, prep, *position[0])
    if run.speed.prefetch:  # the next micro-batches' images are decoded while a step runs
        from ..data.prefetch import Prefetcher

        feed = Prefetcher(batches, lambda mb: load_batch_pixels(run, mb), depth=2)
    else:
        feed = None
    try:
        return _step_loop(run, optim, position, feed if feed is not None else ((mb, None) for mb in batches))
    finally:
        if feed is not None:
            feed.close()


def _step_loop(run: Run, optim: Optim, position: list[tuple[int, int]], feed) -> RunResult:
    cfg, prep, s, commands = run.cfg, run.prep, run.session, run.commands
    ac = s.bundle.alphas_cumprod.to(s.device)
    log_every = 1 if s.device.type == "cpu" else cfg.train.log_every
    clock, losses = _Clock(), _MeanLoss()
    run.lr_history.optimizer = optim.name
    run.events.status(f"Training: {prep.total_steps} steps")
    for mb, pixels in feed:
        losses.add(micro_step(run, mb, ac, optim.scaler, pixels))
        if not mb.ends_step(cfg.optim.grad_accum):
            continue  # accumulate more micro-batches before stepping
        rates = read_rates(optim.optimizer, s.noun.lower())  # the rates this step uses (floats: no device sync)
        optim.step(cfg.optim.max_grad_norm)
        run.step += 1
        run.lr_history.add(run.step, rates)
        position[0] = mb.next
        loss = losses.read()  # the step's one wait for the device: a diverged step must not reach a save
        if loss is not None and not math.isfinite(loss):
            raise run.diverged(f"the loss became {loss}")
        clock.tick()
        at = Point(run.step, mb.epoch + 1, mb.epoch_end, run.step >= prep.total_steps)
        if log_due(at, log_every, prep.total_steps):
            run.loss = losses.take()
        run.events.progress(Progress(step=run.step, total_steps=prep.total_steps, epoch=at.epoch,
                                     total_epochs=prep.total_epochs, loss=run.loss, lr=rates[0].effective,
                                     elapsed=clock.elapsed(), eta=clock.eta(prep.total_steps - run.step),
                                     lr_history=run.lr_history))
        if samples_due(cfg, at):
            run.make_samples()
        if step_save_due(cfg, at):
            run.save(s.step_stem, "step", at.epoch)
        if at.final:
            break
        if commands.stop_requested():
            path = run.save(s.step_stem, "interrupted", at.epoch)
            run.save_state(optim, *mb.next)
            return run.result("interrupted", path, str(s.state_dir))
        if commands.take_save_request():
            run.save(s.step_stem, "step", at.epoch)
            run.save_state(optim, *mb.next)
        if epoch_samples_due(cfg, at):
            run.make_samples()
        if epoch_save_due(cfg, at, prep.total_epochs):
            run.save(s.epoch_stem, "epoch", at.epoch)
        if state_save_due(cfg, at, prep.total_epochs):
            run.save_state(optim, at.epoch, 0)
    if sampling.due(cfg, run.step, final=True):
        run.make_samples()  # no-op when the last step already made a set
    return run.result("finished", run.save("{name}", "final", prep.total_epochs, finished=True))

