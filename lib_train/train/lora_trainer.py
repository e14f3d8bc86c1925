"""LoRA training on a model bundle: the LoRA-specific parts of a :class:`~lib_train.train.session.TrainingSession`
(the run itself is :func:`~lib_train.train.loop.run_training`).

Order of a run (DESIGN.md §2): validated config → :func:`prepare_data` (scan, buckets, step count; all dataset
problems reported before any model work) → :func:`train_lora` on a :class:`~lib_train.models.bundle.ModelBundle`:
attach LoRA (reversible) → cache latents → loop → atomic saves → detach. However the run ends (finished, interrupted,
error, out of memory) the host model is restored exactly: LoRA removed, flags and hooks as before, no weight touched.
"""

from __future__ import annotations

import random
import time

import torch

from ..config import TrainConfig, text_outputs_cached
from ..data import Sample, process_caption
from ..models.bundle import ModelBundle
from ..models.conditioning import ImageSize
from ..network.kohya_file import read_lora_file, save_lora_file
from ..network.lora import LoRANetwork
from . import sampling
from .events import Commands, Events, SafeEvents
from .loop import RunResult, run_training
from .metadata import RunFacts, lora_metadata
from .placement import on_device
from .prepare import PreparedData, dataset_summary, prepare_data
from .sampling import Sampler
from .session import SAVE_DTYPES, RunInfo, TrainingSession
from .sidecar import write_lora_sidecar
from .state import LoadedState

__all__ = ["PreparedData", "RunResult", "dataset_summary", "prepare_data", "train_lora"]


class LoRASession(TrainingSession):
    noun = "LoRA"
    divergence_hint = "Lower the learning rate, use bf16 instead of fp16, or lower network.alpha."

    def __init__(self, cfg: TrainConfig, bundle: ModelBundle, prep: PreparedData, resume: LoadedState | None):
        super().__init__(cfg, bundle, prep, resume)
        self.train_te = cfg.optim.te_lr > 0
        self.train_unet = cfg.network.train_unet
        self.net: LoRANetwork | None = None
        self.facts: RunFacts | None = None
        # caption → its text outputs (``ModelBundle.text_outputs`` of that caption alone: context [77·k, D], and
        # SDXL's pooled output [P]); used when no text encoder trains and the captions do not change between steps
        self.text_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.cache_text = text_outputs_cached(cfg)

    def sample_name_text(self) -> str:
        return self.cfg.output.trigger_words.strip()

    # ---- setup
    def attach(self) -> list[str]:
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
        self.net = net.to(self.device)
        self.net.apply()
        return []

    def detach(self) -> None:
        if self.net is not None:
            self.net.restore()

    def param_groups(self) -> list[dict]:
        o = self.cfg.optim
        return self.net.param_groups(o.lr if self.train_unet else 0.0, o.te_lr)

    def checkpointed_modules(self):
        return self.bundle.unet, self.bundle.text_encoder if self.train_te else None

    def start(self, info: RunInfo) -> None:
        super().start(info)
        scan, prep = self.prep.scan, self.prep
        try:
            hashes = self.bundle.checkpoint_hashes()
        except OSError:
            hashes = {}
        self.facts = RunFacts(session_id=info.session_id, started_at=info.started_at, family=self.bundle.family,
                              prediction=self.bundle.prediction, checkpoint_name=self.bundle.checkpoint_name,
                              checkpoint_hashes=hashes, optimizer=info.optimizer,
                              num_train_images=scan.num_train_images, num_reg_images=scan.num_reg_images,
                              batches_per_epoch=prep.batches_per_epoch, total_steps=prep.total_steps,
                              total_epochs=prep.total_epochs, dataset_dirs=scan.subsets,
                              reg_dataset_dirs=scan.reg_subsets, tag_frequency=scan.tag_frequency(),
                              bucket_info=prep.bucket_info)

    def static_texts(self) -> list[str]:
        """With the text cache on: the empty caption (padding), every image's caption and the sample prompts."""
        if not self.cache_text:
            return []
        texts = [""] + self.prompts([Sample(i, False, 0) for i in range(len(self.prep.items))])
        if sampling.enabled(self.cfg):
            request = sampling.request_for(self.cfg, self.sample_name_text())
            texts += request.texts
        return list(dict.fromkeys(texts))

    def cache_texts(self, texts: list[str]) -> None:
        with torch.no_grad():
            for text in texts:  # one at a time: a batch would pad each context to the batch's chunk count
                out = self.bundle.text_outputs([text])
                self.text_cache[text] = {k: v[0] for k, v in out.items()}

    # ---- per step
    def prompts(self, batch: list[Sample]) -> list[str]:
        d = self.cfg.data
        return [process_caption(self.prep.items[s.index].caption, shuffle=d.shuffle_caption,
                                keep_tokens=d.keep_tokens, caption_dropout_rate=d.caption_dropout,
                                tag_dropout_rate=d.tag_dropout, rng=random.Random(s.seed)) for s in batch]

    def condition(self, prompts: list[str], sizes: list[ImageSize] | None = None):
        bundle = self.bundle
        if self.train_te:
            return bundle.conditioning(prompts, sizes)
        with torch.no_grad():
            if not self.cache_text:
                return bundle.conditioning(prompts, sizes)
            missing = [c for c in dict.fromkeys(["", *prompts]) if c not in self.text_cache]
            if missing:  # not among the static texts (the loop encoded those up front)
                with on_device(bundle.text_encoder, self.device):
                    self.cache_texts(missing)
            return bundle.condition(self._cached(prompts), sizes)

    def _cached(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The batch's text outputs from the cache, contexts padded to the batch's chunk count."""
        rows = [self.text_cache[c] for c in prompts]
        length = max(r["crossattn"].shape[0] for r in rows)
        empty = self.text_cache[""]["crossattn"]
        return {k: torch.stack([_pad_tokens(r[k], length, empty) if k == "crossattn" else r[k] for r in rows])
                for k in rows[0]}

    # ---- saving (file stems: the base class's)
    def save_model(self, stem: str, *, epoch: int, step: int, finished: bool) -> list[str]:
        tensors = self.net.kohya_state_dict(SAVE_DTYPES[self.cfg.output.save_precision])
        meta = lora_metadata(self.cfg, self.facts, stem=stem, epoch=epoch, step=step,
                             finished_at=time.time() if finished else None, lr_history=self.lr_history)
        path = str(save_lora_file(self.out_dir / f"{stem}.safetensors", tensors, meta))
        if finished:
            write_lora_sidecar(path, family=self.bundle.family, activation_text=self.cfg.output.trigger_words)
        return [path]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.net.kohya_state_dict(torch.float32)


def _pad_tokens(z: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """Cached conditionings are ``[77·k, D]`` per caption; a batch needs equal ``k``. Pad with the encoding of an
    empty chunk, as the WebUI pads a batch (FORMATS.md §E.4)."""
    if z.shape[0] == length:
        return z
    return torch.cat([z] + [empty] * ((length - z.shape[0]) // empty.shape[0]), dim=0)


def train_lora(cfg: TrainConfig, bundle: ModelBundle, prep: PreparedData, *, events: Events | None = None,
               commands: Commands | None = None, resume: LoadedState | None = None,
               sampler: Sampler | None = None) -> RunResult:
    """Train a LoRA on ``bundle`` in place. See the module docstring for what is guaranteed about the model."""
    return run_training(LoRASession(cfg, bundle, prep, resume), events=SafeEvents(events or Events()),
                        commands=commands or Commands(), sampler=sampler)
