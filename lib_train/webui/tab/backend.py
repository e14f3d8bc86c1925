"""The Trainer tab wired into the WebUI: the ``on_ui_tabs`` / ``on_ui_settings`` callbacks and the real

:class:`~lib_train.webui.tab.build.Backend` (the job manager under the WebUI's queue, progress and Interrupt).

Settings (section ``("sd_trainer", "Trainer")``, category "training"):

- ``sd_trainer_output_subfolder`` — LoRA runs with an empty output folder go to
  ``<Lora folder>/<this subfolder>/<run name>`` (empty: ``<Lora folder>/<run name>``);
- ``sd_trainer_embedding_subfolder`` — the same for embedding runs, under the embeddings folder;
- ``sd_trainer_sample_prompts`` / ``sd_trainer_sample_every_epochs`` — the tab's initial sample prompts and interval
  (the interval applies only with prompts: samples need prompts);
- ``sd_trainer_offload_vae`` — the tab's initial "move the VAE to the CPU after caching latents".

Tab defaults take effect when the tab is built (after "Reload UI" or a restart), like the WebUI's own ui-config.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

TAB = ("Trainer", "sd_trainer")  # label and id; the WebUI's own tab is ("Train", "train")
SECTION = ("sd_trainer", "Trainer")
OUTPUT_SUBFOLDER = "sd_trainer_output_subfolder"
EMBEDDING_SUBFOLDER = "sd_trainer_embedding_subfolder"
SAMPLE_PROMPTS = "sd_trainer_sample_prompts"
SAMPLE_EVERY_EPOCHS = "sd_trainer_sample_every_epochs"
OFFLOAD_VAE = "sd_trainer_offload_vae"
_SUBFOLDER_SETTING = {"lora": OUTPUT_SUBFOLDER, "embedding": EMBEDDING_SUBFOLDER}


def _default_output_dir(method: str, name: str) -> str:
    """``<method's WebUI folder>/<subfolder setting>/<name>``, or "" (the job manager's own default,
    ``<folder>/<name>``) without a subfolder."""
    from modules import shared

    from ..jobs import METHODS

    setting = _SUBFOLDER_SETTING.get(method)
    sub = str(shared.opts.data.get(setting, "") or "").strip().strip("/\\") if setting else ""
    return os.path.join(METHODS[method].output_root(), sub, name) if sub and method in METHODS else ""


def _run_job(job: Any) -> dict[str, Any]:
    from ..jobs import manager

    return dataclasses.asdict(manager.run(job))


def _interrupt() -> dict[str, Any] | None:
    from ..jobs import manager

    active = manager.active()
    return None if active is None else manager.interrupt(active.status.id).snapshot()


def _latest_status() -> dict[str, Any] | None:
    from ..jobs import manager

    jobs = manager.jobs()
    return jobs[0].snapshot() if jobs else None


def _allowed_roots() -> list[str] | None:
    from ..jobs import restricted_roots

    roots = restricted_roots()
    return None if roots is None else list(roots.values())


def _dataset_roots() -> list[str] | None:
    from ..api import caption_roots

    return caption_roots()


def _model_family() -> str | None:
    from ..host import inspect_host

    return inspect_host().family  # None (nothing trainable loaded): the estimate assumes the default family


def _host_status() -> tuple[bool, str]:
    from ...models.families import RECORDS
    from ..host import FAMILY_LABELS, inspect_host

    report = inspect_host()
    if not report.supported:
        return False, report.reason
    rules = RECORDS[report.family]
    note = "" if rules.clip_skip_applies else f" Clip skip does not apply to {rules.label} (its layers are fixed)."
    return True, f"Ready: {report.checkpoint} ({FAMILY_LABELS[report.family]}) can be trained here.{note}"


def backend():
    """The tab's :class:`~.build.Backend`: the shared job manager, run under ``wrap_gradio_gpu_call``."""
    from modules import call_queue

    from ..jobs import manager
    from ..preprocess import backend_preprocess, backend_upload, interrupt_preprocess
    from .build import Backend

    return Backend(wrap_gpu_call=call_queue.wrap_gradio_gpu_call, create_job=manager.create, run_job=_run_job,
                   interrupt=_interrupt, latest_status=_latest_status, host_status=_host_status,
                   default_output_dir=_default_output_dir, measured_rate=manager.measured_rate,
                   model_family=_model_family, preprocess=backend_preprocess, upload=backend_upload,
                   interrupt_preprocess=interrupt_preprocess, allowed_roots=_allowed_roots,
                   dataset_roots=_dataset_roots)


def on_ui_tabs() -> list[tuple[Any, str, str]]:
    from ..jobs import lora_dir
    from .build import WebuiInfo, build_ui

    from ..preprocess import upscaler_names

    info = WebuiInfo(lora_dir=lora_dir(), upscalers=tuple(upscaler_names()), defaults=tab_defaults())
    return [(build_ui(info, backend()), *TAB)]


def tab_defaults() -> dict[str, Any]:
    """The tab's initial values from our Settings section."""
    from modules import shared

    opts = shared.opts.data
    prompts = str(opts.get(SAMPLE_PROMPTS, "") or "")
    out: dict[str, Any] = {"train.offload_vae": bool(opts.get(OFFLOAD_VAE, True))}
    if prompts.strip():
        out["sample.prompts"] = prompts
        out["sample.every_epochs"] = int(opts.get(SAMPLE_EVERY_EPOCHS, 1) or 0)
    return out


def on_ui_settings() -> None:
    import gradio as gr
    from modules import shared

    shared.opts.add_option(OUTPUT_SUBFOLDER, shared.OptionInfo(
        "", "Subfolder of the Lora folder for new LoRA runs", section=SECTION, category_id="training",
    ).info("a run named NAME goes to <Lora folder>/<subfolder>/NAME; empty: <Lora folder>/NAME"))
    shared.opts.add_option(EMBEDDING_SUBFOLDER, shared.OptionInfo(
        "", "Subfolder of the embeddings folder for new embedding runs", section=SECTION, category_id="training",
    ).info("a run named NAME goes to <embeddings folder>/<subfolder>/NAME; empty: <embeddings folder>/NAME"))
    shared.opts.add_option(SAMPLE_PROMPTS, shared.OptionInfo(
        "", "Default sample prompts for new runs (one per line; [name] = trigger words / embedding)",
        gr.Textbox, {"lines": 3}, section=SECTION, category_id="training",
    ).info("empty: no samples unless a run sets them; takes effect after Reload UI"))
    shared.opts.add_option(SAMPLE_EVERY_EPOCHS, shared.OptionInfo(
        1, "Default sample interval for new runs (epochs)", gr.Slider, {"minimum": 0, "maximum": 50, "step": 1},
        section=SECTION, category_id="training",
    ).info("used with the default sample prompts; 0 = one set at the end of the run"))
    shared.opts.add_option(OFFLOAD_VAE, shared.OptionInfo(
        True, "Move the VAE to the CPU during training (after latents are cached)", section=SECTION,
        category_id="training",
    ).info("frees about 160 MB of GPU memory; samples move it back for the moment they need it"))
