"""What a training method supplies to the shared loop (:mod:`lib_train.train.loop`).

A method (LoRA, textual-inversion embedding) subclasses :class:`TrainingSession` and says what it trains
(``attach``/``detach``, ``param_groups``, ``checkpointed_modules``), how a batch's samples become prompts and the
prompts conditioning (``prompts``, ``condition``; ``static_texts``/``cache_texts`` where text outputs can be computed
once), and how its files are written (``save_model``, ``state_tensors``,
the file stems). The run itself — optimizer, latents, steps, saves, samples, resume state, restoring the model — is
the loop's; a session holds no run state beyond what its method creates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data import Sample
from ..models.bundle import ModelBundle
from ..models.conditioning import ImageSize
from .prepare import PreparedData
from .lr_history import LRHistory
from .state import LoadedState, state_dir_for

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class RunInfo:
    """Facts of the run a method may write into its files (kept by the resume state)."""

    session_id: int
    started_at: float
    optimizer: str  # the optimizer actually used (after a fallback)


class TrainingSession:
    """One method's side of one training session (a resumed run is a new session of the same run)."""

    noun = "model"  # what is trained, for messages ("LoRA", "embedding")
    divergence_hint = "Lower the learning rate or use bf16 instead of fp16."
    # file stems of intermediate saves, formatted with name, step and epoch (1-based, the epoch the save ends)
    step_stem = "{name}-step{step:08d}"  # every N steps, on a save request, on a stop
    epoch_stem = "{name}-{epoch:06d}"  # at the end of every N epochs

    def __init__(self, cfg: TrainConfig, bundle: ModelBundle, prep: PreparedData, resume: LoadedState | None):
        self.cfg, self.bundle, self.prep, self.resume = cfg, bundle, prep, resume
        self.device = bundle.device
        self.out_dir = Path(cfg.output.output_dir)
        self.name = cfg.output.name
        self.state_dir = state_dir_for(self.out_dir, self.name)
        self.info: RunInfo | None = None  # set by start()
        self.lr_history: LRHistory | None = None  # the run's learning rates so far, for the files' metadata (set by
        # the loop)

    def attach(self) -> list[str]:
        """Create the trainable parameters (from the resume state when there is one) and attach them to the model
        (reversibly). Returns warnings for the user (empty: none)."""
        raise NotImplementedError

    def detach(self) -> None:
        """Undo :meth:`attach`; called however the run ends, also after a failed or partial attach."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def checkpointed_modules(self) -> tuple[torch.nn.Module | None, ...]:
        """Modules whose blocks get gradient checkpointing when ``train.gradient_checkpointing`` is on."""
        raise NotImplementedError

    def start(self, info: RunInfo) -> None:
        """Called once, after latent caching and right before the first step."""
        self.info = info

    def prompts(self, batch: list[Sample]) -> list[str]:
        """The text of each sample of a micro-batch (augmentation drawn from the sample's seed)."""
        raise NotImplementedError

    def condition(self, prompts: list[str], sizes: list[ImageSize] | None = None):
        """Prompts (and each image's sizes, for families with size conditioning) → what the bundle's ``predict``
        takes: ``[B, 77·k, width]``, or SDXL's ``{"crossattn", "vector"}`` (under the caller's autocast)."""
        raise NotImplementedError

    def static_texts(self) -> list[str]:
        """Every text the run will condition on, when those are known before the first step and the text encoders
        do not train: the loop then has them encoded once (:meth:`cache_texts`) and moves the text encoders off the
        GPU until the run ends. [] (the default): conditioning is computed every step."""
        return []

    def cache_texts(self, texts: list[str]) -> None:
        """Encode ``texts`` into the session's text cache (called by the loop, under the run's autocast)."""
        raise NotImplementedError

    def save_model(self, stem: str, *, epoch: int, step: int, finished: bool) -> list[str]:
        """Write ``<stem>.<ext>`` atomically into the output folder; returns the paths written, the model file
        first."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors in fp32 for the resume state."""
        raise NotImplementedError

    def sample_name_text(self) -> str:
        """What ``[name]`` in a sample prompt becomes."""
        return self.name

    def sample_embedding(self) -> tuple[str, torch.Tensor | dict[str, torch.Tensor]] | None:
        """The embedding being trained (its name and current vectors: a tensor, or one per text encoder by file key),
        for samplers that must register it."""
        return None
