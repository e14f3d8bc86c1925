"""The Trainer tab's settings, one UI field per config field, and the mapping UI values ↔ config dict.

Every field of the config sections (:data:`lib_train.config.SECTIONS`) has exactly one :class:`FieldSpec`, except
those in :data:`NOT_IN_UI` (each with the reason). ``method`` is the tab's method radio, ``version`` is written by
the config itself. Where a field's component sits is :data:`GROUPS`; its label info is the command-line flag's help
(:mod:`lib_train.cli`) or, for settings without a flag, the comment next to the field in ``lib_train/config.py``.
This module does not import gradio, so it is usable (and tested) on its own.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, fields
from typing import Any

from .. import config as config_mod
from ..cli import EMBEDDING_FLAGS, LORA_FLAGS
from ..config import (
    CACHE_MODES,
    MIXED_PRECISIONS,
    PREDICTIONS,
    SAVE_PRECISIONS,
    TEMPLATES,
    TrainConfig,
    default_config,
)
from ..train.optim import OPTIMIZERS
from ..train.schedule import SCHEDULERS

# Config fields the tab has no component for, and why.
NOT_IN_UI: dict[str, str] = {
    "model.checkpoint": "the WebUI trains the checkpoint that is loaded right now",
}

# Fixed choices (a dropdown); "embedding.template" also takes a .txt file path (custom values allowed).
CHOICES: dict[str, tuple] = {
    "model.prediction": PREDICTIONS,
    "data.cache_latents": CACHE_MODES,
    "data.max_token_length": (75, 150, 225),
    "optim.optimizer": tuple(OPTIMIZERS),
    "optim.scheduler": SCHEDULERS,
    "train.mixed_precision": MIXED_PRECISIONS,
    "output.save_precision": SAVE_PRECISIONS,
    "embedding.template": TEMPLATES,
}
CUSTOM_CHOICE = {"embedding.template"}

LABELS: dict[str, str] = {
    "model.clip_skip": "Clip skip",
    "data.train_dir": "Dataset folder",
    "data.reg_dir": "Regularization folder (optional)",
    "data.default_repeats": "Repeats outside N_name folders",
    "data.enable_buckets": "Aspect-ratio buckets",
    "data.flip": "Random horizontal flip",
    "network.rank": "Rank (dim)",
    "network.conv_rank": "Conv rank (LoCon, 0 = off)",
    "network.train_unet": "Train the UNet",
    "network.init_from": "Continue from LoRA file",
    "embedding.init_from": "Continue from embedding file",
    "embedding.write_pt": "Also write the WebUI .pt format",
    "optim.lr": "Learning rate",
    "optim.te_lr": "Text-encoder learning rate (0 = UNet only)",
    "optim.grad_accum": "Gradient accumulation steps",
    "optim.allow_fallback": "Fall back to AdamW if the optimizer cannot run",
    "train.max_steps": "Max steps (0 = use epochs)",
    "train.min_snr_gamma": "Min-SNR gamma",
    "train.offload_vae": "Move the VAE to the CPU after caching latents",
    "output.output_dir": "Output folder (empty = the Lora folder / run name)",
    "output.name": "Name",
    "output.trigger_words": "Trigger words",
    "output.save_state_every_epochs": "Save resume state every N epochs",
    "sample.prompts": "Sample prompts (one per line; [name] = embedding / trigger words)",
    "sample.every_epochs": "Sample every N epochs",
    "sample.every_steps": "Sample every N steps",
    "sample.negative": "Negative prompt",
    "sample.steps": "Sampling steps",
    "sample.cfg_scale": "CFG scale",
    "sample.seed": "Seed",
    "sample.width": "Width (0 = resolution)",
    "sample.height": "Height (0 = resolution)",
    "sample.sampler": "Sampler",
}
# Text settings shown as a multi-line box.
MULTILINE = {"sample.prompts": 3}

# Where each component sits: (group id, title, keys). Group ids are the accordions' elem_id suffixes.
GROUPS: list[tuple[str, str, list[str]]] = [
    ("dataset", "Dataset", ["data.train_dir", "data.reg_dir", "data.caption_extension", "data.default_repeats",
                            "data.min_image_side"]),
    ("images", "Images and captions", ["data.resolution", "data.enable_buckets", "data.min_bucket_side",
                                       "data.max_bucket_side", "data.bucket_step", "data.bucket_no_upscale",
                                       "data.flip", "data.shuffle_caption", "data.keep_tokens",
                                       "data.caption_dropout", "data.tag_dropout", "data.max_token_length",
                                       "data.cache_latents"]),
    ("network", "Network (LoRA)", ["network.rank", "network.alpha", "network.conv_rank", "network.conv_alpha",
                                   "network.dropout", "network.train_unet", "network.init_from"]),
    ("embedding", "Embedding", ["embedding.init_text", "embedding.vectors", "embedding.template",
                                "embedding.init_from", "embedding.write_pt"]),
    ("optim", "Optimizer and schedule", ["optim.optimizer", "optim.optimizer_args", "optim.lr", "optim.te_lr",
                                         "optim.scheduler", "optim.warmup_steps", "optim.num_cycles", "optim.power",
                                         "optim.grad_accum", "optim.max_grad_norm", "optim.allow_fallback"]),
    ("training", "Training", ["train.epochs", "train.max_steps", "train.batch_size", "train.seed",
                              "train.mixed_precision", "train.gradient_checkpointing", "train.min_snr_gamma",
                              "train.noise_offset", "train.log_every", "train.offload_vae", "model.prediction",
                              "model.clip_skip"]),
    ("output", "Output", ["output.name", "output.output_dir", "output.trigger_words", "output.save_every_epochs",
                          "output.save_every_steps", "output.save_precision", "output.save_state_every_epochs",
                          "output.overwrite", "output.comment"]),
    ("samples", "Sample images", ["sample.prompts", "sample.every_epochs", "sample.every_steps", "sample.negative",
                                  "sample.steps", "sample.cfg_scale", "sample.seed", "sample.width", "sample.height",
                                  "sample.sampler"]),
]
# Groups shown only for one method (the other method ignores that config section).
METHOD_GROUPS = {"network": "lora", "embedding": "embedding"}


@dataclass(frozen=True)
class FieldSpec:
    key: str  # "section.field"
    kind: type  # bool | int | float | str: the field's default's type
    default: Any  # the "lora" method's default
    label: str
    info: str
    choices: tuple | None = None


def _config_comments() -> dict[str, str]:
    """``"section.field"`` → the comment written next to the field in ``lib_train/config.py``."""
    classes = {cls.__name__: section for section, cls in config_mod._SECTION_CLASSES.items()}
    out, section = {}, None
    for line in inspect.getsource(config_mod).splitlines():
        m = re.match(r"class (\w+)", line)
        if m:
            section = classes.get(m.group(1))
            continue
        m = re.match(r"    (\w+): [^=]+=.*?  # (.+)$", line)
        if m and section:
            out[f"{section}.{m.group(1)}"] = m.group(2).strip()
    return out


def _flag_help() -> dict[str, str]:
    helps = {f.key: f.help for f in EMBEDDING_FLAGS}
    helps.update({f.key: f.help for f in LORA_FLAGS})  # the LoRA wording where both have the setting
    return {k: v.replace("%%", "%") for k, v in helps.items()}  # argparse's escaped percent signs


def _build_specs() -> dict[str, FieldSpec]:
    cfg, comments, helps = default_config("lora"), _config_comments(), _flag_help()
    specs = {}
    for section in config_mod.SECTIONS:
        for f in fields(getattr(cfg, section)):
            key = f"{section}.{f.name}"
            if key in NOT_IN_UI:
                continue
            default = getattr(getattr(cfg, section), f.name)
            label = LABELS.get(key) or f.name.replace("_", " ").capitalize()
            specs[key] = FieldSpec(key, type(default), default, label, helps.get(key) or comments.get(key, ""),
                                   CHOICES.get(key))
    return specs


SPECS: dict[str, FieldSpec] = _build_specs()
KEYS: list[str] = list(SPECS)  # the order of the field components in every handler's inputs/outputs


def values_to_dict(method: str, values: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
    """UI values (in :data:`KEYS` order) → a config dict for :func:`lib_train.config.from_dict`."""
    if len(values) != len(KEYS):
        raise ValueError(f"expected {len(KEYS)} values, got {len(values)}")
    data: dict[str, Any] = {"method": method}
    for key, value in zip(KEYS, values):
        section, name = key.split(".")
        if SPECS[key].kind is str and value is None:
            value = ""  # a cleared dropdown/textbox
        data.setdefault(section, {})[name] = value
    return data


def config_to_values(cfg: TrainConfig) -> list[Any]:
    """A config → UI values in :data:`KEYS` order."""
    return [getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in KEYS]


def method_default_changes(method: str, values: list[Any]) -> dict[str, Any]:
    """Fields to change when the method switches to ``method``: each method-dependent default
    (:data:`lib_train.config.METHOD_DEFAULTS`) still at some method's default value takes ``method``'s default."""
    keys = {k for d in config_mod.METHOD_DEFAULTS.values() for k in d}
    defaults = {m: config_to_values(default_config(m)) for m in config_mod.METHODS}
    out = {}
    for key in sorted(keys & set(KEYS)):
        i = KEYS.index(key)
        if any(values[i] == d[i] for d in defaults.values()):
            out[key] = defaults[method][i]
    return out

