"""Textual-inversion training on a model bundle: the embedding-specific parts of a
:class:`~lib_train.train.session.TrainingSession` (the run itself is :func:`~lib_train.train.loop.run_training`).

Only the new vectors are trained (FORMATS.md §C, §E.8): one fp32 parameter ``[n, width]`` per text encoder of the
family (SD1/SD2: one; SDXL: clip_l ``[n, 768]`` and clip_g ``[n, 1280]``, trained jointly by one optimizer at one
learning rate), outside the model, registered on the bundle's
:class:`~lib_train.models.conditioning.TextConditioner` of each encoder so that every occurrence of the embedding's
name in a prompt takes ``n`` token slots and the vectors are spliced into the token-embedding output there — the
conditioning the WebUI computes at inference with the embedding loaded (SDXL: the context of both encoders and the
pooled output of clip_g, which the clip_g vectors reach through its last layers, so they also move ``y``). Every model weight, every
other token-embedding row and every module flag is unchanged afterwards (the optimizer holds the vectors alone; the
registration and hooks are removed and :class:`~lib_train.models.guard.ModelGuard` restores flags).

Prompts: a template line per sample per step (``embedding.template``) with ``[name]`` = the embedding's name
(``output.name``, also the file stem the WebUI uses) and ``[filewords]`` = the caption after shuffle/dropout.

Files: ``name-000500.safetensors`` … (every intermediate save, by step or by epoch, is named by the step count),
final ``name.safetensors``, one tensor per text encoder (:func:`~lib_train.embedding.files.embedding_keys`); with
``embedding.write_pt`` also the WebUI ``.pt`` of each for a one-encoder family (the WebUI's ``.pt`` has no SDXL form:
an SDXL run says so and writes the ``.safetensors`` every SDXL loader reads). Resume state as for LoRA.
"""

from __future__ import annotations

import os
import random

import torch

from ..config import TrainConfig
from ..data import Sample, process_caption
from ..embedding.files import describe_shapes, embedding_keys, embedding_metadata, load_embedding, save_safetensors, save_webui_pt
from ..embedding.inject import Injection
from ..embedding.prompts import FILEWORDS, caption_names, fill, load_template
from ..embedding.vectors import init_vectors, name_collision
from ..errors import DatasetError, Problem, TrainerError
from ..models.bundle import ModelBundle
from .events import Commands, Events, SafeEvents
from .loop import RunResult, run_training
from .metadata import lr_metadata
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


class EmbeddingSession(TrainingSession):
    noun = "embedding"
    step_stem = epoch_stem = "{name}-{step:06d}"  # every intermediate file is named by its step count

    def __init__(self, cfg: TrainConfig, bundle: ModelBundle, prep: PreparedData, resume: LoadedState | None):
        super().__init__(cfg, bundle, prep, resume)
        self.conditioners = bundle.text_conditioners  # one per text encoder, in the family record's order
        self.keys = embedding_keys(bundle.family_rules)  # the tensor name of each in files and the resume state
        self.template = load_template(cfg.embedding.template)
        self.vectors: dict[str, torch.nn.Parameter] = {}
        self.injection: Injection | None = None
        self.checkpoint_hash: str | None = None
        self.write_pt = cfg.embedding.write_pt and len(self.keys) == 1

    # ---- setup
    def initial_vectors(self) -> dict[str, torch.Tensor]:
        """Per text encoder: from the resume state, from ``embedding.init_from``, or created from the init text
        with that encoder's tokenizer and token-embedding table."""
        e = self.cfg.embedding
        widths = {k: c.token_embedding.weight.shape[1] for k, c in zip(self.keys, self.conditioners)}
        if self.resume is None and not e.init_from:
            return {k: init_vectors(c, e.init_text, e.vectors) for k, c in zip(self.keys, self.conditioners)}
        if self.resume is not None:
            if not set(self.keys) <= set(self.resume.network):
                raise TrainerError(f"The resume state in {self.state_dir} holds no {self.bundle.family_rules.label} "
                                   "embedding; it is not from an embedding run on this model family.")
            parts, source = {k: self.resume.network[k] for k in self.keys}, f"the resume state in {self.state_dir}"
        else:
            file = load_embedding(e.init_from)
            parts, source = file.parts, e.init_from
        wanted = {k: (e.vectors, w) for k, w in widths.items()}
        found = {k: tuple(v.shape) for k, v in parts.items()}
        if found != wanted:
            counts = {shape[0] for shape in found.values()}
            same_layout = {k: shape[1:] for k, shape in found.items()} == {k: (w,) for k, w in widths.items()}
            fix = (f"set embedding.vectors (--vectors) to {counts.pop()}" if same_layout
                   else f"use an embedding made for {self.bundle.family_rules.label} models")
            raise TrainerError(f"{source} holds {describe_shapes(found)}; this {self.bundle.family_rules.label} model "
                               f"with embedding.vectors (--vectors) {e.vectors} needs {describe_shapes(wanted)}: "
                               f"{fix}.")
        return parts

    def attach(self) -> list[str]:
        warnings = []
        if self.cfg.embedding.write_pt and not self.write_pt:
            warnings.append(f"embedding.write_pt (--pt): the WebUI's .pt holds one tensor, so it has no form for "
                            f"{self.bundle.family_rules.label} embeddings; only the .safetensors "
                            f"({' + '.join(self.keys)}) is written, which the WebUI, Forge, ComfyUI, kohya and "
                            "diffusers read.")
        self.vectors = {k: torch.nn.Parameter(v.to(self.device, torch.float32))
                        for k, v in self.initial_vectors().items()}
        collision = name_collision(self.conditioners[0], self.name)
        if collision:
            warnings.append(collision)
        self.injection = Injection(self.conditioners, self.name, [self.vectors[k] for k in self.keys])
        return warnings

    def sample_embedding(self) -> tuple[str, torch.Tensor | dict[str, torch.Tensor]] | None:
        if not self.vectors:
            return None
        current = {k: v.detach() for k, v in self.vectors.items()}
        return self.name, (current[self.keys[0]] if len(self.keys) == 1 else current)

    def detach(self) -> None:
        if self.injection is not None:
            self.injection.remove()

    def param_groups(self) -> list[dict]:
        return [{"params": [self.vectors[k] for k in self.keys]}]

    def checkpointed_modules(self):
        return self.bundle.unet, self.bundle.text_encoder  # the gradient reaches the vectors through both

    def start(self, info: RunInfo) -> None:
        super().start(info)
        if self.write_pt:
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

    def condition(self, prompts: list[str], sizes=None):
        return self.bundle.conditioning(prompts, sizes)  # the vectors are injected by the registered slots

    # ---- saving
    def save_model(self, stem: str, *, epoch: int, step: int, finished: bool) -> list[str]:
        dtype = SAVE_DTYPES[self.cfg.output.save_precision]
        tensors = {k: self.vectors[k].detach().to(dtype) for k in self.keys}
        meta = embedding_metadata(title=stem, family=self.bundle.family, prediction=self.bundle.prediction,
                                  resolution=self.cfg.data.resolution, started_at=self.info.started_at,
                                  clip_skip=self.cfg.model.clip_skip, description=self.cfg.output.comment)
        meta.update(lr_metadata(self.lr_history))
        paths = [str(save_safetensors(self.out_dir / f"{stem}.safetensors", tensors, meta))]
        if self.write_pt:
            checkpoint = os.path.splitext(self.bundle.checkpoint_name)[0] or None
            paths.append(str(save_webui_pt(self.out_dir / f"{stem}.pt", tensors[self.keys[0]], name=stem, step=step,
                                           checkpoint_hash=self.checkpoint_hash, checkpoint_name=checkpoint)))
        return paths

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: self.vectors[k].detach().to("cpu", torch.float32).clone() for k in self.keys}


def train_embedding(cfg: TrainConfig, bundle: ModelBundle, prep: PreparedData, *, events: Events | None = None,
                    commands: Commands | None = None, resume: LoadedState | None = None,
                    sampler: Sampler | None = None) -> RunResult:
    """Train a textual-inversion embedding on ``bundle``; the model is left exactly as it was."""
    if resume is not None and resume.state.config.get("method") != "embedding":
        raise TrainerError("This resume state is not from an embedding run; resume it with the command that started "
                           "it (python -m lib_train lora --resume ...).")
    return run_training(EmbeddingSession(cfg, bundle, prep, resume), events=SafeEvents(events or Events()),
                        commands=commands or Commands(), sampler=sampler)
