"""The training methods, one record each: what ``method = "lora"`` / ``"embedding"`` means everywhere.

A :class:`Method` holds every rule that differs by method: its words (sub-command help, noun, label), its config
section and that section's checks, its method-dependent defaults, the trainer's entry points (import strings, so
reading the registry imports no trainer), how its files are named and extended, and how a prompt uses a file. The
command line, config validation, the estimate, WebUI jobs, the tab, the grid and the benchmark read it; the WebUI
layer keeps only its own extras (output folder, list refresh) keyed by the same names (:data:`lib_train.webui.jobs.
METHODS`). A new method is one more record here plus its trainer.

This module imports nothing of the trainer at import time (the config imports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .errors import TrainerError
from .settings import missing

if TYPE_CHECKING:
    from .config import TrainConfig

Bad = Callable[[str, str], None]  # (setting, message) → records a problem


@dataclass(frozen=True)
class Method:
    name: str  # the config's ``method`` and the command-line sub-command
    noun: str  # what a run produces, in messages ("LoRA", "embedding")
    label: str  # the tab's and the grid's word for it ("LoRA", "Embedding")
    cli_help: str  # the sub-command's description (one sentence)
    section: str  # its own config section; other methods ignore it
    validate_section: Callable[["TrainConfig", Bad], None]  # the checks of its section (and of settings only it has)
    prepare: str  # "module:function": cfg → PreparedData (dataset scan and step count)
    train: str  # "module:function": train(cfg, bundle, prep, *, events, commands, resume, ...) → RunResult
    defaults: dict[str, Any] = field(default_factory=dict)  # "section.field" → its default for this method
    own_flags_first: bool = False  # the sub-command's --help lists the method's own settings first
    extensions: tuple[str, ...] = (".safetensors",)  # its model files, preferred first
    numbered_by: str = "epoch"  # what an intermediate save NAME-000001 counts: "epoch" or "step"
    prompt_use: str = ""  # how a prompt uses a file at a weight (docs; the grid's setter below does it)
    set_prompt: str = ""  # "module:function": (prompt, stem, weight, run_stems) → the prompt using that file
    preferred_weight: bool = False  # the WebUI card keeps a preferred weight in the file's .json sidecar
    injects_vectors: bool = False  # trains token vectors: the text conditioning must inject them itself
    trainable_params: str | None = None  # "module:function" (cfg, family) → trained parameters (None: negligible)
    written: Callable[["TrainConfig"], tuple[str, ...]] = lambda cfg: (".safetensors",)  # a run's final files' exts

    def entry(self, which: str) -> Callable[..., Any]:
        """The ``prepare`` or ``train`` function (imported now)."""
        from .settings import resolve

        return resolve(getattr(self, which))


def adaptive_optimizer(optimizer: str) -> bool:
    """Whether ``optimizer`` estimates its own step size (DAdaptation, Prodigy); False for an unknown name (the
    optimizer check reports that)."""
    from .train.optim import OPTIMIZERS

    return any(spec.adaptive and spec.name.lower() == optimizer.strip().lower() for spec in OPTIMIZERS.values())


def _validate_network(cfg: "TrainConfig", bad: Bad) -> None:
    n, o = cfg.network, cfg.optim
    if n.rank < 1:
        bad("network.rank", f"{n.rank} is not a valid rank; use a positive integer such as 8, 16 or 32")
    elif n.rank > 1024:
        bad("network.rank", "is larger than 1024; typical ranks are 4-128")
    if not n.alpha > 0 or not math.isfinite(n.alpha):
        bad("network.alpha", "must be a positive number (often rank/2 or 1)")
    if n.conv_rank < 0:
        bad("network.conv_rank", "must be 0 (off) or a positive integer")
    if n.conv_rank and not n.conv_alpha > 0:
        bad("network.conv_alpha", "must be a positive number")
    if not 0.0 <= n.dropout < 1.0:
        bad("network.dropout", "must be in [0, 1)")
    if n.init_from and missing(n.init_from, "file"):
        bad("network.init_from", missing(n.init_from, "file"))
    if not n.train_unet and o.te_lr == 0:
        bad("network.train_unet", "nothing to train: the UNet is off and the text-encoder learning rate is 0")
    if o.te_lr < 0 or not math.isfinite(o.te_lr):
        bad("optim.te_lr", "must be 0 (UNet only) or a positive number")
    elif n.train_unet and o.te_lr not in (0, o.lr) and adaptive_optimizer(o.optimizer):
        # DAdaptation and Prodigy estimate one step size for all groups and refuse, at their first step, groups
        # whose learning rates differ (other than 0): say so now, with the two values that work.
        bad("optim.te_lr", f"{o.optimizer} uses one learning rate for every part it trains: set the text-encoder "
                           f"learning rate to the learning rate ({o.lr:g}; 1.0 is usual) or to 0 (UNet only)")


def _validate_embedding(cfg: "TrainConfig", bad: Bad) -> None:
    from .config import MAX_VECTORS
    from .embedding.prompts import load_template
    from .embedding.vectors import count_tokens

    e = cfg.embedding
    if not 1 <= e.vectors <= MAX_VECTORS:
        bad("embedding.vectors", f"{e.vectors} is not a valid vector count; use 1-{MAX_VECTORS} (each vector takes "
                                 "one of the 75 token slots of a prompt chunk; 1-8 is usual)")
    tokens = count_tokens(e.init_text)
    if tokens > MAX_VECTORS:
        bad("embedding.init_text", f"is {tokens} tokens long; it must fit one prompt chunk (75 tokens). Use a few "
                                   "words that describe the subject, e.g. 'man in a leather jacket'")
    try:
        load_template(e.template)
    except TrainerError as err:
        bad("embedding.template", str(err))
    if e.init_from and missing(e.init_from, "file"):
        bad("embedding.init_from", missing(e.init_from, "file"))
    if cfg.data.reg_dir:
        bad("data.reg_dir", "regularization images do not apply to embedding training (the model itself does not "
                            "change); remove this setting")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method(name="lora", noun="LoRA", label="LoRA", cli_help="Train a kohya-format LoRA.",
           section="network", validate_section=_validate_network,
           prepare="lib_train.train.lora_trainer:prepare_data", train="lib_train.train.lora_trainer:train_lora",
           prompt_use="<lora:NAME:w>", set_prompt="lib_train.grid.prompts:set_lora_tag", preferred_weight=True,
           trainable_params="lib_train.estimate:lora_params"),
    Method(name="embedding", noun="embedding", label="Embedding",
           cli_help="Train a textual-inversion embedding (WebUI/ComfyUI/diffusers format).",
           section="embedding", validate_section=_validate_embedding,
           prepare="lib_train.train.ti_trainer:prepare_embedding_data",
           train="lib_train.train.ti_trainer:train_embedding",
           defaults={"optim.lr": 5e-3, "output.save_precision": "fp32"},  # the WebUI's TI rate; embeddings are tiny
           own_flags_first=True, extensions=(".safetensors", ".pt", ".bin"), numbered_by="step",
           written=lambda cfg: (".safetensors", ".pt") if cfg.embedding.write_pt else (".safetensors",),
           prompt_use="(NAME:w)", set_prompt="lib_train.grid.prompts:set_embedding_token", injects_vectors=True),
)}
DEFAULT_METHOD = "lora"  # a config without ``method``; the tab's first choice


def get(name: str) -> Method:
    """The method ``name``; :class:`TrainerError` naming the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise TrainerError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def method_of(section: str) -> Method | None:
    """The method whose own section is ``section`` (None for the shared sections)."""
    return next((m for m in METHODS.values() if m.section == section), None)
