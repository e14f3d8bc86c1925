"""LoRA training on a model bundle: data preparation, the loop, saves, resume.

Order of a run (DESIGN.md §2): validated config → :func:`prepare_data` (scan, buckets, step count; all dataset
problems reported before any model work) → :func:`train_lora` on a :class:`~lib_train.models.bundle.ModelBundle`:
attach LoRA (reversible) → cache latents → loop → atomic saves → detach. However the run ends (finished, interrupted,
error, out of memory) the host model is restored exactly: LoRA removed, flags and hooks as before, no weight touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data import (DatasetScan, ImageItem, PlanEntry, assign_bucket, bucket_info, make_buckets, make_entries,
                    plan_epoch, process_caption, scan_dataset, step_formula)
from ..data.batches import batches_per_epoch
from ..errors import DatasetError, Problem, TrainerError
from ..models.bundle import ModelBundle
from ..models.guard import ModelGuard
from ..network.kohya_file import read_lora_file, save_lora_file
from ..network.lora import LoRANetwork
from . import loss as L
from .checkpointing import GradientCheckpointing
from .events import Commands, Events, Progress, SafeEvents
from .metadata import RunFacts, lora_metadata
from .optim import build_optimizer, effective_lr, parse_optimizer_args, resolve_optimizer
from .schedule import make_scheduler
from .sidecar import write_lora_sidecar
from .state import LoadedState, RunState, save_state, state_dir_for

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------- data preparation

@dataclass
class PreparedData:
    scan: DatasetScan
    items: list[ImageItem]
    plans: list  # BucketPlan per item
    entries: list[PlanEntry]
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    total_epochs: int
    formula: str
    bucket_info: dict
    fingerprint: str


def prepare_data(cfg: TrainConfig) -> PreparedData:
    """Scan the dataset, assign buckets and count steps. Raises :class:`DatasetError` with every problem found."""
    d = cfg.data
    scan = scan_dataset(d.train_dir, reg_dir=d.reg_dir or None, caption_extension=d.caption_extension,
                        default_repeats=d.default_repeats, min_side=d.min_image_side)
    scan.raise_if_problems()
    items = [it for it in scan.items if it.samples_per_epoch > 0]
    if not any(not it.is_reg for it in items):
        raise DatasetError([Problem(str(d.train_dir), "no usable training images were found; add .png/.jpg/.webp "
                                                      "images (in N_name sub-folders such as '10_mychar')")])
    buckets = make_buckets(d.resolution, min_side=d.min_bucket_side, max_side=d.max_bucket_side,
                           step=d.bucket_step, enable_buckets=d.enable_buckets)
    plans = [assign_bucket(it.width, it.height, buckets, no_upscale=d.bucket_no_upscale and d.enable_buckets,
                           step=d.bucket_step, max_area=d.resolution * d.resolution) for it in items]
    entries = make_entries(items, plans)
    bs, accum = cfg.train.batch_size, cfg.optim.grad_accum
    per_epoch = batches_per_epoch(entries, batch_size=bs)
    steps_per_epoch = math.ceil(per_epoch / accum)
    if cfg.train.max_steps > 0:
        total_steps = cfg.train.max_steps
        total_epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        total_epochs = cfg.train.epochs
        total_steps = total_epochs * steps_per_epoch
    formula = step_formula(entries, batch_size=bs, epochs=total_epochs, gradient_accumulation_steps=accum)
    if cfg.train.max_steps > 0:
        formula += f"; stopping at max_steps = {total_steps}"
    fingerprint = hashlib.sha256(json.dumps(
        [[str(it.path), it.caption, it.samples_per_epoch, it.is_reg, p.bucket, p.crop] for it, p in zip(items, plans)]
    ).encode()).hexdigest()
    return PreparedData(scan=scan, items=items, plans=plans, entries=entries, batches_per_epoch=per_epoch,
                        steps_per_epoch=steps_per_epoch, total_steps=total_steps, total_epochs=total_epochs,
                        formula=formula, bucket_info=bucket_info(plans, [it.samples_per_epoch for it in items]),
                        fingerprint=fingerprint)


def dataset_summary(prep: PreparedData) -> list[str]:
    """Human-readable lines: folders, counts, buckets, warnings and the step formula."""
    scan = prep.scan
    lines = [f"Dataset: {scan.train_dir}"]
    for s in scan.folders:
        kind = "reg " if s.is_reg else ""
        lines.append(f"  {kind}folder {s.key}: {s.img_count} images × {s.repeats} repeats")
    buckets = prep.bucket_info.get("buckets", {})
    if buckets:
        sizes = ", ".join(f"{b['resolution'][0]}×{b['resolution'][1]} ({b['count']})" for b in buckets.values())
        lines.append(f"  buckets: {sizes}")
    for w in scan.warnings:
        lines.append(f"  warning: {w}")
    lines.append(f"Steps: {prep.formula}")
    return lines


# --------------------------------------------------------------------------------------------- the run

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


def _precision(setting: str, device: torch.device, events: Events) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if device.type != "cuda":
        if setting in ("fp16", "bf16"):
            events.warning(f"mixed precision {setting} needs a GPU; training in fp32 on {device.type}")
        return None
    if setting == "no":
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[setting]


def _make_scaler(enabled: bool):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3 (the WebUI's default torch 2.1)


def _step_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for micro-batch ``index`` of the run (same in every process)."""
    h = hashlib.sha256(f"lib_train.step/{seed}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _oom_types() -> tuple[type[BaseException], ...]:
    t = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (t,) if t else ()


class _Run:
    """One training session (a resumed run is a new session of the same run)."""

    def __init__(self, cfg: TrainConfig, bundle: ModelBundle, prep: PreparedData, events: Events,
                 commands: Commands, resume: LoadedState | None):
        self.cfg, self.bundle, self.prep = cfg, bundle, prep
        self.events, self.commands, self.resume = events, commands, resume
        self.device = bundle.device
        self.out_dir = Path(cfg.output.output_dir)
        self.name = cfg.output.name
        self.state_dir = state_dir_for(self.out_dir, self.name)
        self.saved: list[str] = list(resume.state.saved) if resume else []
        self.notes: list[str] = []
        self.step = resume.state.step if resume else 0
        self.loss_value: float | None = None
        self.train_te = cfg.optim.te_lr > 0
        self.train_unet = cfg.network.train_unet
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.text_cache: dict[str, torch.Tensor] = {}
        self.cache_text = not self.train_te and not (cfg.data.shuffle_caption or cfg.data.caption_dropout
                                                     or cfg.data.tag_dropout)

    # ---- setup
    def build_network(self) -> LoRANetwork:
        cfg, n = self.cfg, self.cfg.network
        torch.manual_seed(cfg.train.seed)  # LoRA init (kaiming) is part of "same seed = same result"
        net = LoRANetwork.for_model(self.bundle.unet if self.train_unet else None,
                                    self.bundle.text_encoder if self.train_te else None,
                                    family=self.bundle.family, rank=n.rank, alpha=n.alpha,
                                    conv_rank=n.conv_rank or None, conv_alpha=n.conv_alpha if n.conv_rank else None,
                                    train_unet=self.train_unet, train_text_encoder=self.train_te, dropout=n.dropout)
        if self.resume:
            net.load_kohya_state_dict(self.resume.network, source=f"the resume state in {self.state_dir}")
        elif n.init_from:
            tensors, _meta = read_lora_file(n.init_from)
            net.load_kohya_state_dict(tensors, source=n.init_from)
        return net.to(self.device)

    def build_optimizer(self, net: LoRANetwork):
        o = self.cfg.optim
        args = parse_optimizer_args(o.optimizer_args)
        name = self.resume.state.optimizer if self.resume else o.optimizer
        used, note = resolve_optimizer(name, args, self.device, o.allow_fallback)
        if note:
            self.events.warning(note)
            self.notes.append(note)
            args = {}
        groups = net.param_groups(o.lr if self.train_unet else 0.0, o.te_lr)
        optimizer = build_optimizer(used, groups, o.lr, args)
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
                raise _Stopped()
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

    # ---- per step
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        if self.train_te:
            return self.bundle.encode_text(captions)
        with torch.no_grad():
            if not self.cache_text:
                return self.bundle.encode_text(captions)
            missing = [c for c in dict.fromkeys(captions) if c not in self.text_cache]
            if missing:
                for c, z in zip(missing, self.bundle.encode_text(missing)):
                    self.text_cache[c] = z
            length = max(self.text_cache[c].shape[0] for c in captions)
            return torch.stack([_pad_tokens(self.text_cache[c], length, self.text_cache[""]) for c in captions])

    def micro_step(self, batch, index: int, ac: torch.Tensor, autocast_dtype, scaler) -> torch.Tensor:
        cfg, d, t_cfg = self.cfg, self.cfg.data, self.cfg.train
        seed = _step_seed(t_cfg.seed, index)
        torch.manual_seed(seed)  # LoRA dropout, if any
        gen = torch.Generator().manual_seed(seed)
        x0 = torch.stack([self.latents_for(s.index, s.flip) for s in batch]).to(self.device)
        captions = [process_caption(self.prep.items[s.index].caption, shuffle=d.shuffle_caption,
                                    keep_tokens=d.keep_tokens, caption_dropout_rate=d.caption_dropout,
                                    tag_dropout_rate=d.tag_dropout, rng=random.Random(s.seed)) for s in batch]
        noise = L.make_noise(x0, gen, noise_offset=t_cfg.noise_offset)
        t = L.sample_timesteps(len(batch), gen, self.device)
        x_t = L.add_noise(x0, noise, t, ac)
        ctx = torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            cond = self.encode_text(captions)
            pred = self.bundle.predict(x_t, t, cond)
        target = L.target_for(x0, noise, t, ac, self.bundle.prediction)
        weights = (L.min_snr_weights(t, ac, t_cfg.min_snr_gamma, self.bundle.prediction)
                   if t_cfg.min_snr_gamma else None)
        loss = L.diffusion_loss(pred, target, weights)
        scaler.scale(loss / cfg.optim.grad_accum).backward()
        return loss.detach()

    # ---- saving
    def facts(self, optimizer_name: str, started_at: float, session_id: int) -> RunFacts:
        scan, prep = self.prep.scan, self.prep
        try:
            hashes = self.bundle.checkpoint_hashes()
        except OSError:
            hashes = {}
        return RunFacts(session_id=session_id, started_at=started_at, family=self.bundle.family,
                        prediction=self.bundle.prediction, checkpoint_name=self.bundle.checkpoint_name,
                        checkpoint_hashes=hashes, optimizer=optimizer_name,
                        num_train_images=scan.num_train_images, num_reg_images=scan.num_reg_images,
                        batches_per_epoch=prep.batches_per_epoch, total_steps=prep.total_steps,
                        total_epochs=prep.total_epochs, dataset_dirs=scan.subsets,
                        reg_dataset_dirs=scan.reg_subsets, tag_frequency=scan.tag_frequency(),
                        bucket_info=prep.bucket_info)

    def save_lora(self, net: LoRANetwork, facts: RunFacts, stem: str, kind: str, epoch: int,
                  finished: bool = False) -> str:
        tensors = net.kohya_state_dict(SAVE_DTYPES[self.cfg.output.save_precision])
        meta = lora_metadata(self.cfg, facts, stem=stem, epoch=epoch, step=self.step,
                             finished_at=time.time() if finished else None)
        path = str(save_lora_file(self.out_dir / f"{stem}.safetensors", tensors, meta))
        if path not in self.saved:
            self.saved.append(path)
        self.events.saved(path, kind)
        return path

    def save_state(self, net, optimizer, scheduler, scaler, facts: RunFacts, epoch: int, batch: int) -> None:
        state = RunState(step=self.step, epoch=epoch, batch=batch, config=self.cfg.to_dict(),
                         session_id=facts.session_id, started_at=facts.started_at, optimizer=facts.optimizer,
                         dataset_fingerprint=self.prep.fingerprint, saved=list(self.saved))
        save_state(self.state_dir, state, net.kohya_state_dict(torch.float32), optimizer.state_dict(),
                   scheduler.state_dict(), scaler.state_dict() if scaler.is_enabled() else None)
        self.events.saved(str(self.state_dir), "state")


class _Stopped(Exception):
    """Internal: a stop was requested before training started (during latent caching)."""


def _pad_tokens(z: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """Cached conditionings are ``[77·k, D]`` per caption; a batch needs equal ``k``. Pad with the encoding of an
    empty chunk, as the WebUI pads a batch (FORMATS.md §E.4)."""
    if z.shape[0] == length:
        return z
    return torch.cat([z] + [empty] * ((length - z.shape[0]) // empty.shape[0]), dim=0)


def train_lora(cfg: TrainConfig, bundle: ModelBundle, prep: PreparedData, *, events: Events | None = None,
               commands: Commands | None = None, resume: LoadedState | None = None) -> RunResult:
    """Train a LoRA on ``bundle`` in place. See the module docstring for what is guaranteed about the model."""
    events = SafeEvents(events or Events())
    commands = commands or Commands()
    run = _Run(cfg, bundle, prep, events, commands, resume)
    final_path = run.out_dir / f"{run.name}.safetensors"
    if resume is None and final_path.exists() and not cfg.output.overwrite:
        raise TrainerError(f"{final_path} already exists. Choose another output.name, delete the file, or set "
                           "output.overwrite (--overwrite) to replace it.")
    if resume is not None and resume.state.dataset_fingerprint != prep.fingerprint:
        events.warning("The dataset or its bucket settings changed since the run started; the resumed run will "
                       "not match an uninterrupted one.")
    run.out_dir.mkdir(parents=True, exist_ok=True)

    guard = ModelGuard(bundle.model)
    vae_device = next(bundle.vae.parameters()).device
    net: LoRANetwork | None = None
    ckpt: GradientCheckpointing | None = None
    try:
        net = run.build_network()
        net.apply()
        if cfg.train.gradient_checkpointing:
            ckpt = GradientCheckpointing(bundle.unet, bundle.text_encoder if run.train_te else None)
        optimizer_name, optimizer, scheduler = run.build_optimizer(net)
        autocast_dtype = _precision(cfg.train.mixed_precision, run.device, events)
        scaler = _make_scaler(autocast_dtype == torch.float16)
        if resume is not None and resume.scaler is not None and scaler.is_enabled():
            scaler.load_state_dict(resume.scaler)
        session = resume.state if resume else None
        facts = run.facts(optimizer_name, session.started_at if session else time.time(),
                          session.session_id if session else random.getrandbits(31))
        try:
            run.cache_latents()
        except _Stopped:
            return RunResult("interrupted", run.step, prep.total_steps, run.saved, notes=run.notes)
        if cfg.data.cache_latents != "off" and run.device.type == "cuda":
            bundle.vae.to("cpu")  # the VAE is not needed any more: free its memory for training
            torch.cuda.empty_cache()
        if run.cache_text:
            with torch.no_grad():
                run.text_cache[""] = bundle.encode_text([""])[0]
        return _loop(run, net, optimizer, scheduler, scaler, autocast_dtype, facts)
    except _oom_types() as e:
        raise TrainerError(
            "Out of GPU memory. Lower the batch size or the resolution, turn on gradient checkpointing, use "
            "AdamW8bit, or close other programs using the GPU. Files saved so far are kept."
            f" ({str(e).splitlines()[0] if str(e) else 'CUDA OOM'})") from None
    finally:
        if ckpt is not None:
            ckpt.remove()
        if net is not None:
            net.restore()
        guard.restore()
        if next(bundle.vae.parameters()).device != vae_device:
            bundle.vae.to(vae_device)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


def _loop(run: _Run, net, optimizer, scheduler, scaler, autocast_dtype, facts: RunFacts) -> RunResult:
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
    events.status(f"Training: {prep.total_steps} steps")

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
            loss = run.micro_step(batches[k], index, ac, autocast_dtype, scaler)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            loss_n += 1
            if (k + 1) % accum and k + 1 != len(batches):
                continue  # accumulate more micro-batches before stepping
            if cfg.optim.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
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
                    raise TrainerError(f"The loss became {value} at step {run.step}: training diverged. Lower the "
                                       "learning rate, use bf16 instead of fp16, or lower network.alpha. The last "
                                       f"saved file is kept: {last_file}")
                run.loss_value = value
            emit(epoch)
            done = run.step >= prep.total_steps
            if cfg.output.save_every_steps and run.step % cfg.output.save_every_steps == 0 and not done:
                run.save_lora(net, facts, f"{run.name}-step{run.step:08d}", "step", epoch + 1)
            if done:
                break
            if commands.stop_requested():
                stem = f"{run.name}-step{run.step:08d}"
                path = run.save_lora(net, facts, stem, "interrupted", epoch + 1)
                next_epoch, next_batch = (epoch, k + 1) if k + 1 < len(batches) else (epoch + 1, 0)
                run.save_state(net, optimizer, scheduler, scaler, facts, next_epoch, next_batch)
                return RunResult("interrupted", run.step, prep.total_steps, run.saved, path, str(run.state_dir),
                                 run.loss_value, run.notes)
            if commands.take_save_request():
                run.save_lora(net, facts, f"{run.name}-step{run.step:08d}", "step", epoch + 1)
                next_epoch, next_batch = (epoch, k + 1) if k + 1 < len(batches) else (epoch + 1, 0)
                run.save_state(net, optimizer, scheduler, scaler, facts, next_epoch, next_batch)
        if run.step >= prep.total_steps:
            break
        n_ep = cfg.output.save_every_epochs
        if n_ep and (epoch + 1) % n_ep == 0 and epoch + 1 < prep.total_epochs:
            run.save_lora(net, facts, f"{run.name}-{epoch + 1:06d}", "epoch", epoch + 1)
        n_st = cfg.output.save_state_every_epochs
        if n_st and (epoch + 1) % n_st == 0 and epoch + 1 < prep.total_epochs:
            run.save_state(net, optimizer, scheduler, scaler, facts, epoch + 1, 0)

    final = run.save_lora(net, facts, run.name, "final", prep.total_epochs, finished=True)
    write_lora_sidecar(final, family=run.bundle.family, activation_text=cfg.output.trigger_words)
    return RunResult("finished", run.step, prep.total_steps, run.saved, final, None, run.loss_value, run.notes)
