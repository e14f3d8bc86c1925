"""Starting points for LoRA training in the Trainer tab: what is trained × how much GPU memory there is.

A preset is plain data: ``"section.field" → value`` for config fields (:mod:`lib_train.config`); choosing one in the
tab sets those fields and leaves every other field as it is. :data:`PRESETS` is the product of

- :data:`SUBJECTS` — what the LoRA learns:
  *character* (one person/character: no flips, the trigger word kept first while tags shuffle),
  *style* (a look across many subjects: higher rank, UNet only, flips),
  *concept* (an object, pose or outfit: flips, a little noise offset);
- :data:`VRAM_TIERS` — SD1.x/SD2.x at 512 px: 6 GB (batch 1, gradient checkpointing, 8-bit AdamW with a fallback
  to AdamW where bitsandbytes cannot run), 8 GB (batch 1 with gradient checkpointing), 12 GB (batch 2), 24 GB
  (batch 4). :mod:`lib_train.estimate` gives each a planning figure under its tier.

All presets use AdamW with min-SNR weighting (γ = 5) and a cosine schedule; learning rates are the usual ones for
LoRA at batch 1-4 (1e-4 UNet, 5e-5 text encoder). They are starting points, not guarantees.
"""

from __future__ import annotations

from typing import Any

from ...config import method_default

PRESET_METHOD = "lora"  # the method the presets are for; another method takes only what applies to it (build.py)
SUBJECTS: dict[str, dict[str, Any]] = {
    "character": {"network.rank": 16, "network.alpha": 8.0, "optim.te_lr": 5e-5, "train.epochs": 10,
                  "data.flip": False, "data.shuffle_caption": True, "data.keep_tokens": 1,
                  "train.noise_offset": 0.0},
    "style": {"network.rank": 32, "network.alpha": 16.0, "optim.te_lr": 0.0, "train.epochs": 12,
              "data.flip": True, "data.shuffle_caption": True, "data.keep_tokens": 0, "train.noise_offset": 0.0},
    "concept": {"network.rank": 16, "network.alpha": 8.0, "optim.te_lr": 5e-5, "train.epochs": 10,
                "data.flip": True, "data.shuffle_caption": True, "data.keep_tokens": 1,
                "train.noise_offset": 0.05},
}

VRAM_TIERS: dict[str, dict[str, Any]] = {
    "6 GB": {"train.batch_size": 1, "train.gradient_checkpointing": True, "data.cache_latents": "memory",
             "optim.optimizer": "AdamW8bit", "optim.allow_fallback": True},
    "8 GB": {"train.batch_size": 1, "train.gradient_checkpointing": True, "data.cache_latents": "memory",
             "optim.optimizer": "AdamW", "optim.allow_fallback": False},
    "12 GB": {"train.batch_size": 2, "train.gradient_checkpointing": False, "data.cache_latents": "memory",
              "optim.optimizer": "AdamW", "optim.allow_fallback": False},
    "24 GB": {"train.batch_size": 4, "train.gradient_checkpointing": False, "data.cache_latents": "memory",
              "optim.optimizer": "AdamW", "optim.allow_fallback": False},
}

_COMMON: dict[str, Any] = {"optim.lr": method_default(PRESET_METHOD, "optim.lr"), "optim.scheduler": "cosine",
                           "optim.warmup_steps": 0, "train.min_snr_gamma": 5.0, "data.resolution": 512}

PRESETS: dict[str, dict[str, Any]] = {
    f"{subject} · {tier}": {**_COMMON, **values, **tier_values}
    for subject, values in SUBJECTS.items()
    for tier, tier_values in VRAM_TIERS.items()
}
