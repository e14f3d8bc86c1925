"""The training session every method shares: latents, the diffusion step, the loop, saves, resume, restore.

A method (LoRA, textual-inversion embedding) subclasses :class:`TrainingSession` and supplies what it trains
(``attach``/``detach``, ``param_groups``), how a batch's prompts become conditioning (``prompts``, ``condition``) and
how its files are written (``save_model``, ``state_tensors``, the file stems). :func:`run_training` does the rest,
in this order: attach (reversible) → gradient checkpointing → optimizer and schedule → cache latents → loop → atomic
saves → detach. However the run ends (finished, interrupted, error, out of memory) the host model is restored
exactly: attachments removed, flags and hooks as before (:class:`~lib_train.models.guard.ModelGuard`).

Exact resume: all randomness of micro-batch ``i`` comes from ``step_seed(seed, i)`` and the sample seeds of the
epoch plan (seeded by (seed, epoch)), so a run resumed at (epoch, batch) draws what the uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import warnings
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data import Sample, plan_epoch
from ..errors import TrainerError
from ..models.bundle import ModelBundle
from ..models.guard import ModelGuard
from . import loss as L
from . import sampling
from .checkpointing import GradientCheckpointing
from .events import Commands, Events, Progress
from .optim import build_optimizer, effective_lr, parse_optimizer_args, resolve_optimizer
from .prepare import PreparedData
from .sampling import Sampler, ddim_sampler
from .schedule import make_scheduler
from .state import LoadedState, RunState, save_state, state_dir_for

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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


def autocast_dtype(setting: str, device: torch.device, events: Events) -> torch.dtype | None:
    """The autocast dtype for ``train.mixed_precision``, or None for fp32."""
    if device.type != "cuda":
        if setting in ("fp16", "bf16"):
            events.warning(f"mixed precision {setting} needs a GPU; training in fp32 on {device.type}")
        return None
    if setting == "no":
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[setting]


def make_scaler(enabled: bool):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3 (the WebUI's default torch 2.1)


def step_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for micro-batch ``index`` of the run (same in every process)."""
    h = hashlib.sha256(f"lib_train.step/{seed}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _oom_types() -> tuple[type[BaseException], ...]:
    t = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (t,) if t else ()


class Stopped(Exception):
    """A stop was requested before training started (during latent caching)."""


class TrainingSession:
    """One training session of one method (a resumed run is a new session of the same run)."""

    noun = "model"  # what is trained, for messages ("LoRA", "embedding")
    divergence_hint = "Lower the learning rate or use bf16 instead of fp16."

    def __init__(self, cfg: TrainConfig, bundle: ModelBundle, prep: PreparedData, events: Events,
                 commands: Commands, resume: LoadedState | None, sampler: Sampler | None = None):
        self.cfg, self.bundle, self.prep = cfg, bundle, prep
        self.events, self.commands, self.resume = events, commands, resume
        self.sampler: Sampler = sampler or ddim_sampler
        self.autocast: torch.dtype | None = None  # the run's autocast dtype (set by run_training)
        self.last_samples: tuple[int, list[Path]] | None = None  # (step, paths) of the newest sample set
        self.sampling_failed = False  # a sampler failure turns samples off for this session (not in the config:
        # the resume state keeps the settings, and a resumed run tries again)
        self.device = bundle.device
        self.out_dir = Path(cfg.output.output_dir)
        self.name = cfg.output.name
        self.state_dir = state_dir_for(self.out_dir, self.name)
        self.saved: list[str] = list(resume.state.saved) if resume else []
        self.notes: list[str] = []
        self.step = resume.state.step if resume else 0
        self.loss_value: float | None = None
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.optimizer_name = ""
        self.started_at = resume.state.started_at if resume else 0.0
        self.session_id = resume.state.session_id if resume else 0

    # ---- what a method supplies
    def attach(self) -> None:
        """Create the trainable parameters and attach them to the model (reversibly)."""
        raise NotImplementedError

    def detach(self) -> None:
        """Undo :meth:`attach`; called however the run ends, also after a failed or partial attach."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def checkpointed_modules(self) -> tuple[torch.nn.Module | None, ...]:
        """Modules whose blocks get gradient checkpointing when ``train.gradient_checkpointing`` is on."""
        raise NotImplementedError

    def prompts(self, batch: list[Sample]) -> list[str]:
        """The text of each sample of a micro-batch (augmentation drawn from the sample's seed)."""
        raise NotImplementedError

    def condition(self, prompts: list[str]) -> torch.Tensor:
        """Prompts → UNet conditioning ``[B, 77·k, width]`` (under the caller's autocast)."""
        raise NotImplementedError

    def save_model(self, stem: str, kind: str, epoch: int, finished: bool = False) -> str:
        """Write ``<stem>.<ext>`` atomically into the output folder and return its path."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors in fp32 for the resume state."""
        raise NotImplementedError

    def step_stem(self, step: int) -> str:
        raise NotImplementedError

    def epoch_stem(self, epoch: int) -> str:
        raise NotImplementedError

    def started(self) -> None:
        """Called once the optimizer is known (``optimizer_name``, ``started_at``, ``session_id`` are set)."""

    def before_loop(self) -> None:
        """Called after latent caching, right before the first step."""

    def sample_name_text(self) -> str:
        """What ``[name]`` in a sample prompt becomes."""
        return self.name

    def sample_embedding(self) -> tuple[str, torch.Tensor] | None:
        """The embedding being trained (its name and current vectors), for samplers that must register it."""
        return None

    # ---- samples
    @contextmanager
    def vae_ready(self):
        """The VAE on the training device for the block (a run moves it to the CPU once latents are cached)."""
        vae = self.bundle.vae
        moved = next(vae.parameters()).device != self.device
        if moved:
            vae.to(self.device)
        try:
            yield vae
        finally:
            if moved:
                vae.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def make_samples(self) -> None:
        """One sample set (``[sample]``), written and reported; a failure is reported and turns sampling off for the
        rest of the run (samples never stop training)."""
        if self.sampling_failed or not sampling.enabled(self.cfg) or (
                self.last_samples and self.last_samples[0] == self.step):
            return
        request = sampling.request_for(self.cfg, self.sample_name_text())
        self.events.status(f"Sampling {len(request.prompts)} image(s) at step {self.step}")
        try:
            images = self.sampler(self, request)
            paths = sampling.save_samples(self.out_dir, self.name, self.step, images)
        except Exception as e:  # noqa: BLE001 - any sampler failure (out of memory too): report, keep training
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            note = (f"Sample images failed at step {self.step} and are turned off for the rest of this run: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            self.events.warning(note)
            self.notes.append(note)
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

    # ---- shared
    def final_path(self) -> Path:
        return self.out_dir / f"{self.name}.safetensors"

    def build_optimizer(self):
        o = self.cfg.optim
        args = parse_optimizer_args(o.optimizer_args)
        name = self.resume.state.optimizer if self.resume else o.optimizer
        used, note = resolve_optimizer(name, args, self.device, o.allow_fallback)
        if note:
            self.events.warning(note)
            self.notes.append(note)
            args = {}
        optimizer = build_optimizer(used, self.param_groups(), o.lr, args)
        scheduler = make_scheduler(optimizer, total_steps=self.prep.total_steps, kind=o.scheduler,
                                   warmup_steps=o.warmup_steps, num_cycles=o.num_cycles, power=o.power)
        if self.resume:
            optimizer.load_state_dict(self.resume.optimizer)
            scheduler.load_state_dict(self.resume.scheduler)
        return used, optimizer, scheduler

    def cache_latents(self) -> None:
        """Encode every (image, flip) the run needs once, through the latent cache."""
        from ..data.latent_cache import LatentCache, load_pixels

        mode = self.cfg.data.cache_latents
        if mode == "off":
            return
        cache_dir = self.out_dir / ".latent-cache" if mode == "disk" else None
        vae = self.bundle.vae
        vae_id = f"{self.bundle.checkpoint_name}|{self.bundle.family}|{next(vae.parameters()).dtype}"
        cache = LatentCache(mode, cache_dir, vae_id)
        flips = (False, True) if self.cfg.data.flip else (False,)
        todo = [(i, f) for i in range(len(self.prep.items)) for f in flips]
        self.events.status(f"Caching latents of {len(todo)} images")
        for n, (i, flip) in enumerate(todo):
            if self.commands.stop_requested():
                raise Stopped()
            item, plan = self.prep.items[i], self.prep.plans[i]
            key = cache.key_for(item.path, plan.bucket, plan.crop, flip)
            self.latents[(i, flip)] = cache.get_or_compute(
                key, lambda: self.bundle.encode_pixels(load_pixels(item.path, plan, flip)[None])[0])
            if (n + 1) % 10 == 0 or n + 1 == len(todo):
                self.events.status(f"Caching latents {n + 1}/{len(todo)}")

    def latents_for(self, index: int, flip: bool) -> torch.Tensor:
        cached = self.latents.get((index, flip))
        if cached is not None:
            return cached
        from ..data.latent_cache import load_pixels

        item, plan = self.prep.items[index], self.prep.plans[index]
        return self.bundle.encode_pixels(load_pixels(item.path, plan, flip)[None])[0].cpu()

    def micro_step(self, batch: list[Sample], index: int, ac: torch.Tensor, autocast: torch.dtype | None,
                   scaler) -> torch.Tensor:
        """Forward and backward of micro-batch ``index``; returns the (detached) loss. A loss that does not depend on
        the trained parameters (e.g. no sample's prompt holds the embedding) is not back-propagated."""
        t_cfg = self.cfg.train
        seed = step_seed(t_cfg.seed, index)
        torch.manual_seed(seed)  # dropout, if any
        gen = torch.Generator().manual_seed(seed)
        x0 = torch.stack([self.latents_for(s.index, s.flip) for s in batch]).to(self.device)
        prompts = self.prompts(batch)
        noise = L.make_noise(x0, gen, noise_offset=t_cfg.noise_offset)
        t = L.sample_timesteps(len(batch), gen, self.device)
        x_t = L.add_noise(x0, noise, t, ac)
        ctx = torch.autocast(self.device.type, dtype=autocast) if autocast else nullcontext()
        with ctx:
            cond = self.condition(prompts)
            pred = self.bundle.predict(x_t, t, cond)
        target = L.target_for(x0, noise, t, ac, self.bundle.prediction)
        weights = (L.min_snr_weights(t, ac, t_cfg.min_snr_gamma, self.bundle.prediction)
                   if t_cfg.min_snr_gamma else None)
        loss = L.diffusion_loss(pred, target, weights)
        if loss.requires_grad:
            scaler.scale(loss / self.cfg.optim.grad_accum).backward()
        return loss.detach()

    def record_saved(self, path: str, kind: str) -> None:
        if path not in self.saved:
            self.saved.append(path)
        self.events.saved(path, kind)

    def save_state(self, optimizer, scheduler, scaler, epoch: int, batch: int) -> None:
        state = RunState(step=self.step, epoch=epoch, batch=batch, config=self.cfg.to_dict(),
                         session_id=self.session_id, started_at=self.started_at, optimizer=self.optimizer_name,
                         dataset_fingerprint=self.prep.fingerprint, saved=list(self.saved))
        save_state(self.state_dir, state, self.state_tensors(), optimizer.state_dict(), scheduler.state_dict(),
                   scaler.state_dict() if scaler.is_enabled() else None)
        self.events.saved(str(self.state_dir), "state")


def run_training(session: TrainingSession) -> RunResult:
    """Run ``session`` on its bundle in place. See the module docstring for what is guaranteed about the model."""
    cfg, prep, events, bundle, resume = session.cfg, session.prep, session.events, session.bundle, session.resume
    final_path = session.final_path()
    if resume is None and final_path.exists() and not cfg.output.overwrite:
        raise TrainerError(f"{final_path} already exists. Choose another output.name, delete the file, or set "
                           "output.overwrite (--overwrite) to replace it.")
    if resume is not None and resume.state.dataset_fingerprint != prep.fingerprint:
        events.warning("The dataset or its bucket settings changed since the run started; the resumed run will "
                       "not match an uninterrupted one.")
    session.out_dir.mkdir(parents=True, exist_ok=True)

    guard = ModelGuard(bundle.model)
    vae_device = next(bundle.vae.parameters()).device
    ckpt: GradientCheckpointing | None = None
    try:
        session.attach()
        if cfg.train.gradient_checkpointing:
            ckpt = GradientCheckpointing(*session.checkpointed_modules())
        session.optimizer_name, optimizer, scheduler = session.build_optimizer()
        dtype = autocast_dtype(cfg.train.mixed_precision, session.device, events)
        session.autocast = dtype
        scaler = make_scaler(dtype == torch.float16)
        if resume is not None and resume.scaler is not None and scaler.is_enabled():
            scaler.load_state_dict(resume.scaler)
        if resume is None:
            session.started_at, session.session_id = time.time(), random.getrandbits(31)
        session.started()
        try:
            session.cache_latents()
        except Stopped:
            return RunResult("interrupted", session.step, prep.total_steps, session.saved, notes=session.notes)
        if cfg.train.offload_vae and cfg.data.cache_latents != "off" and session.device.type == "cuda":
            bundle.vae.to("cpu")  # the VAE is not needed any more: free its memory for training
            torch.cuda.empty_cache()
        session.before_loop()
        return _loop(session, optimizer, scheduler, scaler, dtype)
    except _oom_types() as e:
        raise TrainerError(
            "Out of GPU memory. Lower the batch size or the resolution, turn on gradient checkpointing, use "
            "AdamW8bit, or close other programs using the GPU. Files saved so far are kept."
            f" ({str(e).splitlines()[0] if str(e) else 'CUDA OOM'})") from None
    finally:
        if ckpt is not None:
            ckpt.remove()
        session.detach()
        guard.restore()
        if next(bundle.vae.parameters()).device != vae_device:
            bundle.vae.to(vae_device)
        if session.device.type == "cuda":
            torch.cuda.empty_cache()


def _loop(run: TrainingSession, optimizer, scheduler, scaler, autocast: torch.dtype | None) -> RunResult:
    cfg, prep, events, commands = run.cfg, run.prep, run.events, run.commands
    ac = run.bundle.alphas_cumprod.to(run.device)
    accum = cfg.optim.grad_accum
    params = [p for g in optimizer.param_groups for p in g["params"]]
    log_every = 1 if run.device.type == "cpu" else cfg.train.log_every
    start_epoch = run.resume.state.epoch if run.resume else 0
    start_batch = run.resume.state.batch if run.resume else 0
    times: deque[float] = deque(maxlen=20)
    session_start = last = time.perf_counter()
    loss_sum: torch.Tensor | None = None
    loss_n = 0
    last_save: tuple[str, int, str] | None = None  # (stem, step, path): a stem is written once per step
    events.status(f"Training: {prep.total_steps} steps")

    def save(stem: str, kind: str, epoch: int, finished: bool = False) -> str:
        nonlocal last_save
        if last_save is not None and last_save[:2] == (stem, run.step):
            return last_save[2]
        path = run.save_model(stem, kind, epoch, finished)
        run.write_preview(path)
        last_save = (stem, run.step, path)
        return path

    def emit(epoch: int) -> None:
        rate = (sum(times) / len(times)) if times else None
        lrs = effective_lr(optimizer)
        events.progress(Progress(step=run.step, total_steps=prep.total_steps, epoch=epoch + 1,
                                 total_epochs=prep.total_epochs, loss=run.loss_value,
                                 lr=lrs[0] if lrs else None, elapsed=time.perf_counter() - session_start,
                                 eta=rate * (prep.total_steps - run.step) if rate else None))

    for epoch in range(start_epoch, prep.total_epochs):
        batches = plan_epoch(prep.entries, batch_size=cfg.train.batch_size, seed=cfg.train.seed, epoch=epoch,
                             flip_aug=cfg.data.flip)
        first = start_batch if epoch == start_epoch else 0
        for k in range(first, len(batches)):
            index = epoch * prep.batches_per_epoch + k
            loss = run.micro_step(batches[k], index, ac, autocast, scaler)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            loss_n += 1
            if (k + 1) % accum and k + 1 != len(batches):
                continue  # accumulate more micro-batches before stepping
            stepped = any(p.grad is not None for p in params)  # else no micro-batch reached the parameters
            if stepped:
                if cfg.optim.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
            with warnings.catch_warnings():
                if not stepped:  # torch warns when a schedule steps before its optimizer ever has
                    warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.step += 1
            now = time.perf_counter()
            times.append(now - last)
            last = now
            if run.step % log_every == 0 or run.step == prep.total_steps:
                value = float(loss_sum) / loss_n
                loss_sum, loss_n = None, 0
                if not math.isfinite(value):
                    last_file = run.saved[-1] if run.saved else "none yet"
                    raise TrainerError(f"The loss became {value} at step {run.step}: training diverged. "
                                       f"{run.divergence_hint} The last saved file is kept: {last_file}")
                run.loss_value = value
            emit(epoch)
            done = run.step >= prep.total_steps
            if sampling.due(cfg, run.step) or (done and sampling.due(cfg, run.step, final=True)):
                run.make_samples()
            if cfg.output.save_every_steps and run.step % cfg.output.save_every_steps == 0 and not done:
                save(run.step_stem(run.step), "step", epoch + 1)
            if done:
                break
            next_epoch, next_batch = (epoch, k + 1) if k + 1 < len(batches) else (epoch + 1, 0)
            if commands.stop_requested():
                path = save(run.step_stem(run.step), "interrupted", epoch + 1)
                run.save_state(optimizer, scheduler, scaler, next_epoch, next_batch)
                return RunResult("interrupted", run.step, prep.total_steps, run.saved, path, str(run.state_dir),
                                 run.loss_value, run.notes)
            if commands.take_save_request():
                save(run.step_stem(run.step), "step", epoch + 1)
                run.save_state(optimizer, scheduler, scaler, next_epoch, next_batch)
        if run.step >= prep.total_steps:
            break
        if sampling.due(cfg, run.step, epoch_end=epoch + 1):
            run.make_samples()
        n_ep = cfg.output.save_every_epochs
        if n_ep and (epoch + 1) % n_ep == 0 and epoch + 1 < prep.total_epochs:
            save(run.epoch_stem(epoch + 1), "epoch", epoch + 1)
        n_st = cfg.output.save_state_every_epochs
        if n_st and (epoch + 1) % n_st == 0 and epoch + 1 < prep.total_epochs:
            run.save_state(optimizer, scheduler, scaler, epoch + 1, 0)

    if sampling.due(cfg, run.step, final=True):
        run.make_samples()  # no-op when the last step already made a set
    final = run.save_model(run.name, "final", prep.total_epochs, finished=True)
    run.write_preview(final)
    return RunResult("finished", run.step, prep.total_steps, run.saved, final, None, run.loss_value, run.notes)
