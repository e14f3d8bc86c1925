"""Textual-inversion training on a model bundle: the embedding-specific parts of a
:class:`~lib_train.train.session.TrainingSession` (the run itself is :func:`~lib_train.train.loop.run_training`).

Only the new vectors are trained (FORMATS.md §C, §E.8): they are an fp32 parameter ``[n, width]`` outside the
model, registered on the bundle's :class:`~lib_train.models.conditioning.TextConditioner` so that every occurrence
of the embedding's name in a prompt takes ``n`` token slots and the vectors are spliced into the token-embedding
output there — the conditioning the WebUI computes at inference with the embedding loaded. Every model weight, every
other token-embedding row and every module flag is unchanged afterwards (the optimizer holds the vectors alone; the
registration and hooks are removed and :class:`~lib_train.models.guard.ModelGuard` restores flags).

Prompts: a template line per sample per step (``embedding.template``) with ``[name]`` = the embedding's name
(``output.name``, also the file stem the WebUI uses) and ``[filewords]`` = the caption after shuffle/dropout.

Files: ``name-000500.safetensors`` … (every intermediate save, by step or by epoch, is named by the step count),
final ``name.safetensors``; with ``embedding.write_pt`` also the WebUI ``.pt`` of each. Resume state as for LoRA.
"""

from __future__ import annotations

import os
import random

import torch

from ..config import TrainConfig
from ..data import Sample, process_caption
from ..embedding.files import EMB_KEY, embedding_metadata, load_embedding, save_safetensors, save_webui_pt
from ..embedding.inject import Injection
from ..embedding.prompts import FILEWORDS, caption_names, fill, load_template
from ..embedding.vectors import init_vectors, name_collision
from ..errors import DatasetError, Problem, TrainerError
from ..models.bundle import ModelBundle
from ..models.conditioning import TextConditioner
from ..models.families import RECORDS
from .events import Commands, Events, SafeEvents
from .loop import RunResult, run_training
from .prepare import PreparedData, prepare_data
from .sampling import Sampler
from .session import SAVE_DTYPES, RunInfo, TrainingSession
from .state import LoadedState

_LISTED = 5  # files named in a problem list before "... and N more"


def prepare_embedding_data(cfg: TrainConfig) -> PreparedData:
    """:func:`~lib_train.train.prepare.prepare_data`, plus: without a template every caption must name the
    embedding (else those images would train nothing)."""
    prep = prepare_data(cfg)
    if cfg.embedding.template == "none":
        name = cfg.output.name
        missing = [it for it in prep.items if not caption_names(it.caption, name)]
        if missing:
            problems = [Problem(str(it.path), f"the caption {it.caption!r} does not contain the embedding name "
                                              f"'{name}' or [name]") for it in missing[:_LISTED]]
            if len(missing) > _LISTED:
                problems.append(Problem(str(cfg.data.train_dir), f"... and {len(missing) - _LISTED} more captions"))
            problems.append(Problem("embedding.template (--template)",
                                    "with template 'none' the captions are the prompts: add the name (or [name]) to "
                                    "each caption, or use the subject or style template"))
            raise DatasetError(problems)
    return prep


def embedding_refusal(family: str) -> str:
    """Why an embedding cannot be trained on ``family`` ("" when it can): the embedding trainer knows one text
    encoder per family (SDXL's two: issue #11)."""
    rules = RECORDS[family]
    if len(rules.text_encoders) == 1:
        return ""
    return (f"Embedding (textual inversion) training is not available for {rules.label} checkpoints yet (they have "
            f"{len(rules.text_encoders)} text encoders); train a LoRA instead, or load an SD1.x or SD2.x checkpoint "
            "to train an embedding.")


class EmbeddingSession(TrainingSession):
    noun = "embedding"
    step_stem = epoch_stem = "{name}-{step:06d}"  # every intermediate file is named by its step count

    def __init__(self, cfg: TrainConfig, bundle: ModelBundle, prep: PreparedData, resume: LoadedState | None):
        super().__init__(cfg, bundle, prep, resume)
        refusal = embedding_refusal(bundle.family)
        if refusal:
            raise TrainerError(refusal)
        self.conditioner: TextConditioner = bundle.encode_text
        self.template = load_template(cfg.embedding.template)
        self.vectors: torch.nn.Parameter | None = None
        self.injection: Injection | None = None
        self.checkpoint_hash: str | None = None

    # ---- setup
    def initial_vectors(self) -> torch.Tensor:
        """From the resume state, from ``embedding.init_from``, or created from the init text."""
        e = self.cfg.embedding
        width = self.conditioner.token_embedding.weight.shape[1]
        if self.resume is not None:
            if EMB_KEY not in self.resume.network:
                raise TrainerError(f"The resume state in {self.state_dir} holds no embedding; it is not from an "
                                   "embedding run.")
            vec, source = self.resume.network[EMB_KEY], f"the resume state in {self.state_dir}"
        elif e.init_from:
            vec, source = load_embedding(e.init_from).vectors, e.init_from
        else:
            return init_vectors(self.conditioner, e.init_text, e.vectors)
        if tuple(vec.shape) != (e.vectors, width):
            raise TrainerError(f"{source} holds {vec.shape[0]} vectors of width {vec.shape[1]}; this "
                               f"{self.bundle.family} model needs width {width}, and embedding.vectors (--vectors) is "
                               f"{e.vectors}. Use an embedding made for this model family, with --vectors "
                               f"{vec.shape[0]}.")
        return vec

    def attach(self) -> list[str]:
        self.vectors = torch.nn.Parameter(self.initial_vectors().to(self.device, torch.float32))
        warning = name_collision(self.conditioner, self.name)
        self.injection = Injection(self.conditioner, self.name, self.vectors)
        return [warning] if warning else []

    def sample_embedding(self) -> tuple[str, torch.Tensor] | None:
        return (self.name, self.vectors.detach()) if self.vectors is not None else None

    def detach(self) -> None:
        if self.injection is not None:
            self.injection.remove()

    def param_groups(self) -> list[dict]:
        return [{"params": [self.vectors]}]

    def checkpointed_modules(self):
        return self.bundle.unet, self.bundle.text_encoder  # the gradient reaches the vectors through both

    def start(self, info: RunInfo) -> None:
        super().start(info)
        if self.cfg.embedding.write_pt:
            try:
                self.checkpoint_hash = self.bundle.checkpoint_hashes().get("sha256", "")[:10] or None
            except OSError:
                self.checkpoint_hash = None

    # ---- per step
    def prompts(self, batch: list[Sample]) -> list[str]:
        d, out = self.cfg.data, []
        for s in batch:
            rng = random.Random(s.seed)
            line = rng.choice(self.template) if self.template else FILEWORDS
            caption = process_caption(self.prep.items[s.index].caption, shuffle=d.shuffle_caption,
                                      keep_tokens=d.keep_tokens, caption_dropout_rate=d.caption_dropout,
                                      tag_dropout_rate=d.tag_dropout, rng=rng)
            out.append(fill(line, self.name, caption))
        return out

    def condition(self, prompts: list[str], sizes=None) -> torch.Tensor:
        return self.conditioner(prompts)  # one text encoder, no size conditioning

    # ---- saving
    def save_model(self, stem: str, *, epoch: int, step: int, finished: bool) -> list[str]:
        vec = self.vectors.detach().to(SAVE_DTYPES[self.cfg.output.save_precision])
        meta = embedding_metadata(title=stem, family=self.bundle.family, prediction=self.bundle.prediction,
                                  resolution=self.cfg.data.resolution, started_at=self.info.started_at,
                                  clip_skip=self.cfg.model.clip_skip, description=self.cfg.output.comment)
        paths = [str(save_safetensors(self.out_dir / f"{stem}.safetensors", vec, meta))]
        if self.cfg.embedding.write_pt:
            checkpoint = os.path.splitext(self.bundle.checkpoint_name)[0] or None
            paths.append(str(save_webui_pt(self.out_dir / f"{stem}.pt", vec, name=stem, step=step,
                                           checkpoint_hash=self.checkpoint_hash, checkpoint_name=checkpoint)))
        return paths

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {EMB_KEY: self.vectors.detach().to("cpu", torch.float32).clone()}


def train_embedding(cfg: TrainConfig, bundle: ModelBundle, prep: PreparedData, *, events: Events | None = None,
                    commands: Commands | None = None, resume: LoadedState | None = None,
                    sampler: Sampler | None = None) -> RunResult:
    """Train a textual-inversion embedding on ``bundle``; the model is left exactly as it was."""
    if resume is not None and resume.state.config.get("method") != "embedding":
        raise TrainerError("This resume state is not from an embedding run; resume it with the command that started "
                           "it (python -m lib_train lora --resume ...).")
    return run_training(EmbeddingSession(cfg, bundle, prep, resume), events=SafeEvents(events or Events()),
                        commands=commands or Commands(), sampler=sampler)
