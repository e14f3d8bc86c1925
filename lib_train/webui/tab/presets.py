"""Starting points for LoRA training in the Trainer tab: what is trained × how much GPU memory there is, per family.

A preset is plain data: ``"section.field" → value`` for config fields (:mod:`lib_train.config`); choosing one in the
tab sets those fields and leaves every other field as it is. Every preset is in the one table :data:`TABLE`: a set
of presets per group of families, each the product of its *subjects* and its *memory tiers* (a preset = the set's
common fields, then the subject's, then the tier's):

- subjects — what the LoRA learns:
  *character* (one person/character: no flips, the trigger word kept first while tags shuffle),
  *style* (a look across many subjects: higher rank, UNet only, flips),
  *concept* (an object, pose or outfit: flips, a little noise offset);
- SD1.x/SD2.x tiers, at 512 px: 6 GB (batch 1, gradient checkpointing, 8-bit AdamW with a fallback to AdamW where
  bitsandbytes cannot run), 8 GB (batch 1 with gradient checkpointing), 12 GB (batch 2), 24 GB (batch 4);
- SDXL tiers, every one UNet only with gradient checkpointing and buckets up to 2048 px (kohya sd-scripts' tips for
  SDXL: "--network_train_unet_only is highly recommended for SDXL LoRA"; LoRA in 8 GB, 10 GB recommended, with
  gradient checkpointing, cached text-encoder outputs and latents, an 8-bit optimizer or Adafactor, dim 4-8 on
  8 GB): 8 GB (768 px, rank 8, Adafactor), 12 GB (1024 px, batch 1), 16 GB (1024 px, batch 2), 24 GB (1024 px,
  batch 4). At 8 and 12 GB captions are not shuffled, so the text encoders' outputs are cached and the encoders
  leave the GPU; at 16 and 24 GB captions shuffle as for SD1 (the encoders stay, without gradients).

:func:`presets_for` gives the presets of the loaded model's family (SD1/SD2 presets for no model) for a method: an
embedding run takes only the fields that apply to it (:func:`preset_fields`: memory and data settings, not a LoRA's
network or learning rates), and a preset is offered for a method only where :mod:`lib_train.estimate` puts that run
under :data:`FIT_SHARE` of its tier. Every LoRA preset fits (tests/test_ui_build.py for SD1,
tests/test_sdxl_estimate.py for SDXL); an SDXL embedding keeps both text encoders on the GPU (its vectors train
through them), so the SDXL 8 GB tier is not offered for embeddings. All presets use min-SNR weighting (γ = 5) and a cosine schedule; the learning
rates are the usual ones for LoRA at batch 1-4 (1e-4 UNet). They are starting points, not guarantees.

The tab's dropdown (:func:`preset_choices`) starts at :data:`NO_PRESET` ("None", as the WebUI's own Script dropdown
starts: nothing applied) and labels every preset with its predicted peak for the loaded family and the chosen method
(``"character · 12 GB (≈ 5.3 GB)"``, :func:`choice_label`); such a label maps back to its preset
(:func:`preset_name`), and "None", an empty choice or anything unknown sets no field.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from ... import methods
from ...config import SETTINGS, TrainConfig, default_config, method_default
from ...estimate import estimate
from ...models.families import SD1, SD2, SDXL, family_or_default

PRESET_METHOD = "lora"  # the method the presets are for; another method takes only what applies to it (build.py)

_LR = method_default(PRESET_METHOD, "optim.lr")

# Preset set → "families" (the family names it is for), "prefix" (of its preset names), "common", "subjects" and
# "tiers" (name → fields). A preset's name is "<prefix><subject> · <tier>".
TABLE: dict[str, dict[str, Any]] = {
    "SD1.x/SD2.x": {
        "families": (SD1.name, SD2.name),
        "prefix": "",
        "common": {"optim.lr": _LR, "optim.scheduler": "cosine", "optim.warmup_steps": 0, "train.min_snr_gamma": 5.0,
                   "data.resolution": 512},
        "subjects": {
            "character": {"network.rank": 16, "network.alpha": 8.0, "optim.te_lr": 5e-5, "train.epochs": 10,
                          "data.flip": False, "data.shuffle_caption": True, "data.keep_tokens": 1,
                          "train.noise_offset": 0.0},
            "style": {"network.rank": 32, "network.alpha": 16.0, "optim.te_lr": 0.0, "train.epochs": 12,
                      "data.flip": True, "data.shuffle_caption": True, "data.keep_tokens": 0,
                      "train.noise_offset": 0.0},
            "concept": {"network.rank": 16, "network.alpha": 8.0, "optim.te_lr": 5e-5, "train.epochs": 10,
                        "data.flip": True, "data.shuffle_caption": True, "data.keep_tokens": 1,
                        "train.noise_offset": 0.05},
        },
        "tiers": {
            "6 GB": {"train.batch_size": 1, "train.gradient_checkpointing": True, "data.cache_latents": "memory",
                     "optim.optimizer": "AdamW8bit", "optim.allow_fallback": True},
            "8 GB": {"train.batch_size": 1, "train.gradient_checkpointing": True, "data.cache_latents": "memory",
                     "optim.optimizer": "AdamW", "optim.allow_fallback": False},
            "12 GB": {"train.batch_size": 2, "train.gradient_checkpointing": False, "data.cache_latents": "memory",
                      "optim.optimizer": "AdamW", "optim.allow_fallback": False},
            "24 GB": {"train.batch_size": 4, "train.gradient_checkpointing": False, "data.cache_latents": "memory",
                      "optim.optimizer": "AdamW", "optim.allow_fallback": False},
        },
    },
    "SDXL": {
        "families": (SDXL.name,),
        "prefix": "SDXL ",
        "common": {"optim.lr": _LR, "optim.scheduler": "cosine", "optim.warmup_steps": 0, "train.min_snr_gamma": 5.0,
                   "data.resolution": 1024, "data.min_bucket_side": 512, "data.max_bucket_side": 2048,
                   "train.gradient_checkpointing": True, "data.cache_latents": "memory"},
        "subjects": {  # UNet only: kohya's advice for SDXL LoRA (two text encoders give unexpected results)
            "character": {"network.rank": 16, "network.alpha": 8.0, "optim.te_lr": 0.0, "train.epochs": 10,
                          "data.flip": False, "data.shuffle_caption": True, "data.keep_tokens": 1,
                          "train.noise_offset": 0.0},
            "style": {"network.rank": 32, "network.alpha": 16.0, "optim.te_lr": 0.0, "train.epochs": 12,
                      "data.flip": True, "data.shuffle_caption": True, "data.keep_tokens": 0,
                      "train.noise_offset": 0.0},
            "concept": {"network.rank": 16, "network.alpha": 8.0, "optim.te_lr": 0.0, "train.epochs": 10,
                        "data.flip": True, "data.shuffle_caption": True, "data.keep_tokens": 1,
                        "train.noise_offset": 0.05},
        },
        "tiers": {
            "8 GB": {"data.resolution": 768, "train.batch_size": 1, "network.rank": 8, "network.alpha": 4.0,
                     "data.shuffle_caption": False, "optim.optimizer": "Adafactor", "optim.allow_fallback": False},
            "12 GB": {"train.batch_size": 1, "data.shuffle_caption": False, "optim.optimizer": "AdamW",
                      "optim.allow_fallback": False},
            "16 GB": {"train.batch_size": 2, "optim.optimizer": "AdamW", "optim.allow_fallback": False},
            "24 GB": {"train.batch_size": 4, "optim.optimizer": "AdamW", "optim.allow_fallback": False},
        },
    },
}


def _expand(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{entry['prefix']}{subject} · {tier}": {**entry["common"], **values, **tier_values}
            for subject, values in entry["subjects"].items()
            for tier, tier_values in entry["tiers"].items()}


PRESETS_BY_SET: dict[str, dict[str, dict[str, Any]]] = {name: _expand(entry) for name, entry in TABLE.items()}
ALL_PRESETS: dict[str, dict[str, Any]] = {k: v for presets in PRESETS_BY_SET.values() for k, v in presets.items()}
_DEFAULT_SET = "SD1.x/SD2.x"
# The SD1.x/SD2.x set under its former names (the tab without a loaded model, tests).
SUBJECTS = TABLE[_DEFAULT_SET]["subjects"]
VRAM_TIERS = TABLE[_DEFAULT_SET]["tiers"]
PRESETS = PRESETS_BY_SET[_DEFAULT_SET]


def set_for(family: str | None) -> str:
    """The preset set for a family name (the SD1.x/SD2.x set for None or a family without presets)."""
    return next((name for name, entry in TABLE.items() if family in entry["families"]), _DEFAULT_SET)


FIT_SHARE = 0.9  # a preset's estimate stays under this share of its tier (the desktop and the estimate's error)


NO_PRESET = "None"  # the dropdown's first choice and starting value: no preset, the fields stay as they are
_PEAK_SUFFIX = re.compile(r" \(≈ [0-9.]+ GB\)$")


def choice_label(name: str, gib: float) -> str:
    """A preset's dropdown label: its name and predicted peak ("character · 12 GB (≈ 5.3 GB)")."""
    return f"{name} (≈ {gib:.1f} GB)"


def preset_name(choice: str | None) -> str | None:
    """The preset a dropdown choice stands for (its name, or its label with the predicted peak); None for
    :data:`NO_PRESET`, an empty choice or anything that is not a preset."""
    name = _PEAK_SUFFIX.sub("", (choice or "").strip())
    return name if name in ALL_PRESETS else None


def preset_fields(name: str | None, method: str = PRESET_METHOD) -> dict[str, Any]:
    """The fields preset ``name`` (a name or a dropdown label, :func:`preset_name`) sets for a run of ``method``:
    all of them for the presets' own method; for another (an embedding run) only the settings that apply to it and
    have no default of its own — its memory and data settings (a LoRA's learning rates and network would be wrong
    for the vectors). Nothing for :data:`NO_PRESET` or a choice that is not a preset."""
    preset = dict(ALL_PRESETS.get(preset_name(name) or "", {}))
    if method != PRESET_METHOD and method in methods.METHODS:
        m = methods.METHODS[method]
        preset = {k: v for k, v in preset.items() if SETTINGS[k].applies_to(method) and k not in m.defaults
                  and methods.method_of(k.split(".")[0]) in (None, m)}
    return preset


def preset_config(name: str, method: str = PRESET_METHOD) -> TrainConfig:
    """``method``'s default config with preset ``name`` applied."""
    cfg = default_config(method)
    for key, value in preset_fields(name, method).items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    return cfg


@lru_cache(maxsize=None)
def predicted_peaks(family: str | None, method: str = PRESET_METHOD) -> dict[str, float]:
    """Every preset of ``family``'s set (offered or not) → the estimate's peak in GiB for a run of ``method`` on
    that family (``family``: a name as ``Backend.model_family`` gives it; None: the default family)."""
    family_name = family_or_default(family).name
    return {name: estimate(preset_config(name, method), None, family_name).vram_gib
            for name in PRESETS_BY_SET[set_for(family)]}


@lru_cache(maxsize=None)
def presets_for(family: str | None, method: str = PRESET_METHOD) -> dict[str, dict[str, Any]]:
    """The presets of the loaded model's family (``family``: its name, as ``Backend.model_family`` gives it) that a
    run of ``method`` fits within :data:`FIT_SHARE` of their tier by the estimate."""
    peaks = predicted_peaks(family, method)
    return {name: fields for name, fields in PRESETS_BY_SET[set_for(family)].items()
            if peaks[name] < FIT_SHARE * tier_gib(name)}


def preset_choices(family: str | None, method: str = PRESET_METHOD) -> list[str]:
    """The dropdown's choices: :data:`NO_PRESET`, then each preset offered (:func:`presets_for`) labelled with its
    predicted peak (:func:`choice_label`)."""
    peaks = predicted_peaks(family, method)
    return [NO_PRESET] + [choice_label(name, peaks[name]) for name in presets_for(family, method)]


def tier_gib(name: str) -> float:
    """A preset's memory tier in GiB ("SDXL style · 12 GB" → 12.0; cards sold as "12 GB" hold 12 GiB)."""
    return float(name.rsplit("·", 1)[1].split()[0])
