"""The ``ss_*`` and ``modelspec.*`` metadata of a LoRA file (FORMATS.md §B).

Values are strings (dicts as JSON). The keys are the ones kohya's trainer writes and the WebUI, Forge, ComfyUI and
kohya's tools read: the WebUI's Lora tab uses ``ss_output_name`` as the alias, ``ss_base_model_version``/``ss_v2`` for
its SD-version filter, ``ss_tag_frequency`` for "training dataset tags", ``ss_bucket_info``/``ss_dataset_dirs`` for
the resolution and dataset size, ``ss_training_started_at`` for the date. ``sshs_*`` hashes are added by
:func:`lib_train.network.kohya_file.save_lora_file`.

Our own keys (prefix ``sd_trainer_``, apart from kohya's ``ss_``/``sshs_`` and ``modelspec.``; LoRA and embedding
files alike) hold the learning-rate history of the run up to the save (:func:`lr_metadata`): ``sd_trainer_lr_final``
(JSON ``{"optimizer", "step", "groups": {label: {"lr", "base_lr", "d", "d_lr"}}}``, the rates of the last step;
``d``/``d_lr`` only for D-Adaptation/Prodigy) and ``sd_trainer_lr_history`` (JSON ``{"series", "rows"}``, at most
:data:`~lib_train.train.lr_history.FILE_POINTS` rows ``[step, value per series]``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..config import TrainConfig, bucket_sides
from ..models.families import get_family
from .lr_history import FILE_POINTS, LRHistory

LR_FINAL_KEY = "sd_trainer_lr_final"
LR_HISTORY_KEY = "sd_trainer_lr_history"


@dataclass
class RunFacts:
    """What the metadata needs to know about a run besides its config."""

    session_id: int
    started_at: float  # unix time
    family: str  # a family name (lib_train.models.families)
    prediction: str  # "eps" | "v"
    checkpoint_name: str
    checkpoint_hashes: dict[str, str]  # {"legacy": 8 hex, "sha256": 64 hex} where known
    optimizer: str  # the optimizer actually used
    num_train_images: int
    num_reg_images: int
    batches_per_epoch: int
    total_steps: int
    total_epochs: int
    dataset_dirs: dict[str, dict[str, int]]
    reg_dataset_dirs: dict[str, dict[str, int]]
    tag_frequency: dict[str, dict[str, int]]
    bucket_info: dict[str, Any] | None


def lora_metadata(cfg: TrainConfig, facts: RunFacts, *, stem: str, epoch: int, step: int,
                  finished_at: float | None = None, lr_history: LRHistory | None = None) -> dict[str, str]:
    """Metadata for one saved file; ``stem`` is its file stem (also the WebUI alias, ``ss_output_name``);
    ``lr_history``: the run's rates so far (:func:`lr_metadata`)."""
    d, n, o, t = cfg.data, cfg.network, cfg.optim, cfg.train
    fam = get_family(facts.family)  # every family-dependent value below comes from its record
    clip_skip = fam.encoder_layer(cfg.model.clip_skip)
    network_args = {"conv_dim": str(n.conv_rank), "conv_alpha": str(n.conv_alpha)} if n.conv_rank else None
    res = f"({d.resolution}, {d.resolution})"
    meta: dict[str, Any] = {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.started_at,
        "ss_output_name": stem,
        "ss_training_comment": cfg.output.comment or None,
        "ss_trainer": f"sd-webui-trainer {__version__}",
        "ss_sd_model_name": facts.checkpoint_name,
        "ss_sd_model_hash": facts.checkpoint_hashes.get("legacy"),
        "ss_new_sd_model_hash": facts.checkpoint_hashes.get("sha256"),
        "ss_v2": fam.ss_v2,
        "ss_base_model_version": fam.ss_base_model_version(facts.prediction),
        "ss_clip_skip": clip_skip,
        "ss_max_token_length": d.max_token_length,
        "ss_network_module": "networks.lora",
        "ss_network_dim": n.rank,
        "ss_network_alpha": n.alpha,
        "ss_network_dropout": n.dropout,
        "ss_network_args": json.dumps(network_args) if network_args else None,
        "ss_learning_rate": o.lr,
        "ss_unet_lr": o.lr if n.train_unet else 0.0,
        "ss_text_encoder_lr": o.te_lr,
        "ss_optimizer": facts.optimizer + (f"({o.optimizer_args})" if o.optimizer_args else ""),
        "ss_lr_scheduler": o.scheduler,
        "ss_lr_warmup_steps": o.warmup_steps,
        "ss_max_train_steps": facts.total_steps,
        "ss_num_epochs": facts.total_epochs,
        "ss_epoch": epoch,
        "ss_steps": step,
        "ss_num_batches_per_epoch": facts.batches_per_epoch,
        "ss_gradient_accumulation_steps": o.grad_accum,
        "ss_gradient_checkpointing": t.gradient_checkpointing,
        "ss_mixed_precision": t.mixed_precision,
        "ss_max_grad_norm": o.max_grad_norm,
        "ss_seed": t.seed,
        "ss_noise_offset": t.noise_offset or None,
        "ss_min_snr_gamma": t.min_snr_gamma or None,
        "ss_cache_latents": d.cache_latents != "off",
        "ss_caption_dropout_rate": d.caption_dropout,
        "ss_caption_tag_dropout_rate": d.tag_dropout,
        "ss_batch_size_per_device": t.batch_size,
        "ss_total_batch_size": t.batch_size * o.grad_accum,
        "ss_resolution": res,
        "ss_flip_aug": d.flip,
        "ss_shuffle_caption": d.shuffle_caption,
        "ss_keep_tokens": d.keep_tokens,
        "ss_enable_bucket": d.enable_buckets,
        "ss_bucket_no_upscale": d.bucket_no_upscale,
        "ss_min_bucket_reso": bucket_sides(d)[0],
        "ss_max_bucket_reso": bucket_sides(d)[1],
        "ss_num_train_images": facts.num_train_images,
        "ss_num_reg_images": facts.num_reg_images,
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(facts.reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_bucket_info": json.dumps(facts.bucket_info) if facts.bucket_info is not None else "null",
        "ss_training_finished_at": finished_at,
        # modelspec (SAI model spec), FORMATS.md §B.2
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": fam.modelspec_architecture(facts.prediction),
        "modelspec.implementation": fam.modelspec_implementation,
        "modelspec.title": stem,
        "modelspec.resolution": f"{d.resolution}x{d.resolution}",
        "modelspec.date": _dt.datetime.fromtimestamp(facts.started_at).replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if facts.prediction == "v" else "epsilon",
        "modelspec.encoder_layer": clip_skip,
        "modelspec.trigger_phrase": cfg.output.trigger_words or None,
    }
    if clip_skip is None:
        meta["ss_clip_skip"] = "None"  # kohya writes the string "None" when clip skip is unset
    return {**{k: _text(v) for k, v in meta.items() if v is not None}, **lr_metadata(lr_history)}


def lr_metadata(history: LRHistory | None) -> dict[str, str]:
    """The ``sd_trainer_lr_*`` keys of a saved file (module docstring); none before the first step."""
    if history is None or not history.final:
        return {}
    short = history.thinned(FILE_POINTS)
    final = {"optimizer": history.optimizer, "step": history.step,
             "groups": {r.label: r.to_json() for r in history.final}}
    return {LR_FINAL_KEY: json.dumps(final),
            LR_HISTORY_KEY: json.dumps({"series": short.series, "rows": short.points()})}


def lr_from_metadata(meta: dict[str, str]) -> LRHistory | None:
    """The learning-rate history a file's metadata holds (:func:`lr_metadata`); None when it holds none (a file of
    another trainer, or of a run before this key existed) or a damaged one."""
    try:
        final = json.loads(meta[LR_FINAL_KEY])
        history = json.loads(meta[LR_HISTORY_KEY])
        groups = final["groups"]
        data = {"optimizer": final.get("optimizer", ""), "series": history["series"], "rows": history["rows"],
                "final": groups}
    except (KeyError, TypeError, ValueError):
        return None
    return LRHistory.from_json(data)


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    return str(v)


def read_lr_history(model_file: str | os.PathLike) -> LRHistory | None:
    """The learning-rate history in a saved file's metadata (its header alone is read); None when the file is
    missing, not a safetensors file, or holds none."""
    from safetensors import safe_open

    try:
        with safe_open(str(model_file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - an unreadable file has no history to show
        return None
    return lr_from_metadata(meta)
