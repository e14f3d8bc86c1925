"""The Trainer tab: ``build_ui(info, backend)`` → a ``gr.Blocks``.

The builder never touches the WebUI (adetailer's pattern): WebUI facts come in as :class:`WebuiInfo`, and what a
button does to the WebUI as :class:`Backend` callables (built from ``modules`` in :mod:`.backend`), so the tab
builds and its handlers run with plain gradio (tests/test_ui_build.py).

Layout: method and presets; the dataset panel (folder, Scan → validation report, folder counts, step formula, the
first images with their captions); the settings in accordions, one component per config field
(:mod:`.fields`); config save/load; Train / Interrupt / Resume with the WebUI's progress bar, and the job's
status. Train and Resume go through ``Backend.wrap_gpu_call`` (the WebUI's ``wrap_gradio_gpu_call``) with a task
id as the first input, which ``sd_trainer_start()`` (javascript/trainer.js) fills in and follows with the WebUI's
``requestProgress``. Uses only gradio APIs present in 3.41 and 4.x (``gr.update``, no ``.style()``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from ... import methods
from ...atomic import is_within
from ...config import ADAPTIVE_LR, TrainConfig, from_dict, load_config, method_default, save_config
from ...estimate import INPUTS as _ESTIMATE_INPUTS
from ...settings import format_default
from ...data import scan_dataset
from ...errors import ConfigError, DatasetError, Problem, TrainerError
from ...models.families import family_or_default, labels_text
from ...train.metadata import read_lr_history
from ..gradio_compat import js_kwarg
from . import render
from .fields import CUSTOM_CHOICE, GROUPS, KEYS, METHOD_CHOICES, METHOD_GROUPS, MULTILINE, SPECS, FieldSpec, \
    config_to_values, method_default_changes, rows_of, values_to_dict
from .presets import NO_PRESET, preset_choices, preset_fields
from .preprocess_panel import build_preprocess_panel
from .captions_panel import build_captions_panel

GALLERY_IMAGES = 24  # images shown after a scan
# Settings the live estimate depends on (a change of any of them refreshes it): what the estimate reads, and what the
# step count reads besides.
ESTIMATE_KEYS = tuple(k for k in dict.fromkeys(_ESTIMATE_INPUTS + ("data.enable_buckets", "train.epochs",
                                                                   "train.max_steps")) if k in KEYS)
_RUN_FILE = re.compile(r"^(?P<name>.+?)(-step\d+|-\d+)?$")  # NAME, NAME-000003, NAME-step00000020


@dataclass(frozen=True)
class WebuiInfo:
    """Facts about the WebUI the tab is built in (read once, at UI build time)."""

    lora_dir: str  # where LoRA runs go by default (``--lora-dir``), a run per subfolder
    upscalers: tuple[str, ...] = ()  # the WebUI's upscaler names (the preprocessing panel's crop upscaler)
    defaults: dict[str, Any] = field(default_factory=dict)  # "section.field" → the tab's initial value (Settings)


@dataclass(frozen=True)
class Backend:
    """What the tab's buttons do in the WebUI (:mod:`.backend` builds the real one)."""

    wrap_gpu_call: Callable[..., Callable]  # (fn, extra_outputs=[...]) → fn run under the WebUI's queue and progress
    create_job: Callable[..., Any]  # (data=None, *, resume_dir=None) → a job; raises TrainerError subclasses
    run_job: Callable[[Any], dict]  # run a created job in this thread → its status dict (JobStatus fields)
    interrupt: Callable[[], dict | None]  # stop the active job after its step → its status dict; None if none
    latest_status: Callable[[], dict | None]  # the newest job's status dict; None before the first job
    host_status: Callable[[], tuple[bool, str]]  # (trainable, text): can the loaded checkpoint be trained here?
    default_output_dir: Callable[[str, str], str]  # (method, run name) → folder for an empty one ("" = the backend's)
    measured_rate: Callable[[], Any] = lambda: None  # a lib_train.estimate.MeasuredRate from a run here, or None
    model_family: Callable[[], str | None] = lambda: None  # the loaded model's family, for the estimate (None: default)
    preprocess: Callable[[dict], dict] | None = None  # the WebUI's preprocessing (webui/preprocess.py); None: no panel
    upload: Callable[..., dict] | None = None  # store uploaded files in a run folder
    interrupt_preprocess: Callable[[], None] | None = None  # stop a preprocessing run after its current image
    allowed_roots: Callable[[], list[str] | None] = lambda: None  # folders config files may be read from/written to
    # (a shared WebUI with --hide-ui-dir-config); None = any
    dataset_roots: Callable[[], list[str] | None] = lambda: None  # folders datasets may be read and captions
    # written in (a shared WebUI: the upload folder); None = any


def config_file_for_run(path: str) -> Path:
    """The ``NAME.config.json`` a run wrote next to its files, for a LoRA/embedding file of that run (also an
    epoch or step file, ``NAME-000003`` / ``NAME-step00000020``), the config itself, or the run's folder."""
    p = Path(path.strip()).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.config.json"))
        if len(found) != 1:
            raise TrainerError(f"{p} holds {len(found)} *.config.json files; give the LoRA file or the config file "
                               "of the run itself.")
        return found[0]
    if p.name.endswith(".config.json"):
        return p
    name = _RUN_FILE.match(p.stem).group("name")
    candidates = [p.with_name(f"{p.stem}.config.json"), p.with_name(f"{name}.config.json")]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise TrainerError(f"No settings file next to {p}: expected {candidates[-1].name} in {p.parent} (runs of "
                           "this trainer write one there).")
    return found


def _component(spec: FieldSpec, value: Any) -> gr.components.Component:
    elem_id = "sd_trainer_" + spec.key.replace(".", "_")
    common = {"label": spec.label, "value": value, "elem_id": elem_id, "info": spec.info,
              "visible": spec.shown_for(methods.DEFAULT_METHOD)}  # the method radio starts at the default
    if spec.kind is bool:
        return gr.Checkbox(elem_classes=["sd-trainer-check"], **common)
    if spec.radio:  # (label, value): a value keeps its type (gradio 3.41's Dropdown makes every choice a string)
        return gr.Radio(choices=[(str(c), c) for c in spec.choices], **common)
    if spec.choices is not None:
        return gr.Dropdown(choices=list(spec.choices), allow_custom_value=spec.key in CUSTOM_CHOICE, **common)
    if spec.slider:
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step, **common)
    if spec.kind in (int, float):
        number = gr.Number(precision=0 if spec.kind is int else None, minimum=spec.minimum, maximum=spec.maximum,
                           step=spec.step, **common)
        number.preprocess = _unchecked(number)
        return number
    return gr.Textbox(lines=MULTILINE.get(spec.key, 1), **common)


def _unchecked(number: gr.Number) -> Callable[[Any], Any]:
    """``number``'s preprocess without gradio's range check: the range guides the browser's input, and a value
    typed past it reaches :func:`lib_train.config.validate`, whose message names the setting and what to do
    (gradio's own error names neither, and would fail the live estimate on every change)."""

    def preprocess(x: Any) -> Any:
        return None if x is None else number._round_to_precision(x, number.precision)

    return preprocess


def _field_update(key: str, method: str, changes: dict[str, Any]) -> dict[str, Any]:
    """A field's update on a switch to ``method``: its new value (``changes``); where the method words its help
    differently, that help; and for a setting of some methods only, whether it shows."""
    spec = SPECS[key]
    update = {"value": changes[key]} if key in changes else {}
    if spec.method_info:
        update["info"] = spec.info_for(method)
    if spec.methods is not None:
        update["visible"] = spec.shown_for(method)
    return gr.update(**update)


class _Handlers:
    """The tab's event functions (plain Python: values in, values/HTML out)."""

    def __init__(self, info: WebuiInfo, backend: Backend):
        self.info, self.backend = info, backend

    # ---- settings
    @staticmethod
    def apply_preset(name: str | None, method: str = methods.DEFAULT_METHOD) -> list[Any]:
        """The fields the preset sets for ``method`` (:func:`.presets.preset_fields`; ``name``: a dropdown choice);
        "None", no choice or an unknown one changes no field."""
        preset = preset_fields(name, method)
        return [gr.update(value=preset[k]) if k in preset else gr.update() for k in KEYS]

    def method_changed(self, method: str, *values: Any) -> list[Any]:
        """The method's sections shown, its defaults where the user kept the other method's, and the presets that
        fit a run of it on the loaded model's family."""
        shown = [gr.update(visible=METHOD_GROUPS[g] == method) for g in METHOD_GROUPS]
        changes = method_default_changes(method, list(values))
        return shown + [_field_update(k, method, changes) for k in KEYS] + \
            [gr.update(choices=preset_choices(self.backend.model_family(), method), value=NO_PRESET)]

    @staticmethod
    def optimizer_changed(method: str, optimizer: str, lr: Any, te_lr: Any) -> list[Any]:
        """The learning rates a switch of optimizer needs: to DAdaptation/Prodigy a rate below 0.1 becomes 1.0 and a
        trained text encoder's rate the learning rate (they refuse two rates; :func:`lib_train.config.adaptive_rates`
        is the same rule for configs); back to another optimizer, rates of 0.1 or more become the method's
        defaults. Anything else the user typed stays."""
        def num(v: Any) -> float | None:
            try:
                return float(v)
            except (TypeError, ValueError):
                return None

        lr_v, te_v = num(lr), num(te_lr)
        new_lr, new_te = lr_v, te_v
        if methods.adaptive_optimizer(optimizer or ""):
            if lr_v is not None and lr_v < 0.1:
                new_lr = ADAPTIVE_LR
            if te_v and new_lr is not None:
                new_te = new_lr
        else:
            if lr_v is not None and lr_v >= 0.1:
                new_lr = method_default(method, "optim.lr")
            if te_v is not None and te_v >= 0.1:
                new_te = method_default("lora", "optim.te_lr")
        return [gr.update(value=new_lr) if new_lr != lr_v else gr.update(),
                gr.update(value=new_te) if new_te != te_v else gr.update()]

    @staticmethod
    def _filled(cfg: TrainConfig, note: str) -> list[Any]:
        notes = [note] + ([f"model.checkpoint ({cfg.model.checkpoint}) is not used here: the WebUI trains the "
                           "loaded checkpoint."] if cfg.model.checkpoint else [])
        return [cfg.method, *config_to_values(cfg), "".join(render.message(n, "ok") for n in notes)]

    def _check_path(self, path: str) -> None:
        """Refuse a config path outside the allowed folders of a shared WebUI."""
        roots = self.backend.allowed_roots()
        if roots is None:
            return
        if not is_within(path, roots):
            raise TrainerError(f"This WebUI runs with --hide-ui-dir-config: config files can only be read from or "
                               f"written to {', '.join(roots)}.")

    def load_config(self, path: str) -> list[Any]:
        try:
            self._check_path(path.strip())
            cfg = load_config(path.strip())
            return self._filled(cfg, f"Loaded {path.strip()}")
        except TrainerError as e:
            return [gr.update()] * (len(KEYS) + 1) + [render.error(e)]

    def load_run(self, path: str) -> list[Any]:
        """The run's settings, and the learning-rate chart of its file (the given one, else the final one)."""
        try:
            config_file = config_file_for_run(path)
            self._check_path(str(config_file))
            filled = self._filled(load_config(config_file), f"Loaded the settings of the run from {config_file}")
        except TrainerError as e:
            return [gr.update()] * (len(KEYS) + 1) + [render.error(e)]
        name = config_file.name[:-len(".config.json")]
        given = Path(path.strip()).expanduser()
        model = given if given.suffix == ".safetensors" else config_file.with_name(f"{name}.safetensors")
        filled[-1] += render.run_lr(read_lr_history(model), finished=model.stem == name)
        return filled

    def save_config(self, path: str, method: str, *values: Any) -> str:
        path = path.strip()
        try:
            self._check_path(path)
            if Path(path).suffix.lower() not in (".json", ".toml"):
                raise TrainerError(f"'{path}': give a file name ending in .json or .toml.")
            cfg = from_dict(values_to_dict(method, values))
            return render.message(f"Saved {save_config(cfg, path)}", "ok")
        except TrainerError as e:
            return render.error(e)

    # ---- dataset
    def scan(self, method: str, *values: Any) -> tuple[str, list[tuple[str, str]], Any, str]:
        """The validation report, the first :data:`GALLERY_IMAGES` train images with their captions, the scan (kept
        for the live estimate) and the estimate."""
        report, gallery, scan = self._scan(method, values)
        return report, gallery, scan, self.estimate(scan, method, *values)

    def _scan(self, method: str, values: tuple[Any, ...]) -> tuple[str, list[tuple[str, str]], Any]:
        from ...train.prepare import prepare_data

        try:
            cfg = from_dict(values_to_dict(method, values))
            d = cfg.data
            if not d.train_dir.strip():
                raise ConfigError([Problem("data.train_dir", "give the folder with the training images")])
            try:
                prep = prepare_data(cfg)
            except DatasetError:  # the full report: every problem, warning and folder
                scan = scan_dataset(d.train_dir, reg_dir=d.reg_dir or None, caption_extension=d.caption_extension,
                                    default_repeats=d.default_repeats, min_side=d.min_image_side)
                if not scan.problems:
                    scan.problems.append(Problem(d.train_dir, "no usable training images were found; add "
                                                              ".png/.jpg/.webp images in N_name sub-folders such "
                                                              "as '10_mychar'"))
                return render.scan_report(scan, None), [], None
        except TrainerError as e:
            return render.error(e), [], None
        shown = [it for it in prep.items if not it.is_reg][:GALLERY_IMAGES]
        return (render.scan_report(prep.scan, prep),
                [(str(it.path), it.caption or "(no caption)") for it in shown], prep.scan)

    def estimate(self, scan: Any, method: str, *values: Any) -> str:
        """GPU memory and (with a measured rate) time for the settings; the step count once a scan is kept."""
        from ...estimate import estimate
        from ...train.prepare import plan_steps

        try:
            cfg = from_dict(values_to_dict(method, values))
        except TrainerError as e:
            return render.error(e)
        steps = formula = None
        if scan is not None:
            try:
                plan = plan_steps(cfg, scan)
                steps, formula = plan.total_steps, plan.formula
            except (TrainerError, ValueError, ZeroDivisionError):
                pass  # settings mid-edit (e.g. batch size 0): the validation at Train names them
        family = family_or_default(self.backend.model_family()).name
        est = estimate(cfg, steps, family, self.backend.measured_rate())
        return render.estimate_html(est, steps, formula)

    # ---- running
    def _request(self, method: str, values: tuple[Any, ...]) -> dict[str, Any]:
        data = values_to_dict(method, values)
        out = data["output"]
        if not str(out["output_dir"]).strip() and str(out["name"]).strip():
            out["output_dir"] = self.backend.default_output_dir(method, str(out["name"]).strip())
        return data

    def _run(self, create: Callable[[], Any]) -> tuple[str]:
        try:
            job = create()
        except TrainerError as e:
            return (render.error(e),)
        return (render.job_outcome(self.backend.run_job(job)),)  # the details are in the job panel below

    def train(self, task_id: str, method: str, *values: Any) -> tuple[str]:
        return self._run(lambda: self.backend.create_job(self._request(method, values)))

    def resume(self, task_id: str, state_dir: str) -> tuple[str]:
        if not state_dir.strip():
            return (render.error(TrainerError("Give the resume-state folder (.NAME-state, or the run's output "
                                              "folder) of the interrupted run.")),)
        return self._run(lambda: self.backend.create_job(resume_dir=state_dir.strip()))

    def interrupt(self) -> str:
        status = self.backend.interrupt()
        if status is None:
            return render.message("No training job is running.")
        return render.message("Stopping after the current step; the file and the resume state are saved.") + \
            render.job_status(status)

    def status(self) -> tuple[str, list[str]]:
        """The newest job's status (with its loss curve) and its newest sample images."""
        status = self.backend.latest_status()
        if not status:
            return render.message("No training job in this session yet."), []
        return render.job_status(status), [p for p in status.get("samples") or [] if Path(p).is_file()]

    def check_host(self, method: str = methods.DEFAULT_METHOD) -> list[Any]:
        """The host's status line, the preset list of the loaded model's family for ``method``, and the fields whose
        default differs for that family (``Family.config_defaults``: SDXL turns gradient checkpointing on) set to
        it."""
        ok, text = self.backend.host_status()
        family_name = self.backend.model_family()
        family = family_or_default(family_name)
        defaults = dict(family.config_defaults) if ok else {}
        if defaults:
            text += " " + "; ".join(f"{SPECS[k].label}: {format_default(v)}" for k, v in defaults.items()) + \
                f" (the {family.label} default)."
        return [render.message(text, "ok" if ok else "error"),
                gr.update(choices=preset_choices(family_name, method), value=NO_PRESET),
                *[gr.update(value=defaults[k]) if k in defaults else gr.update() for k in KEYS]]


def build_ui(info: WebuiInfo, backend: Backend) -> gr.Blocks:
    """The Trainer tab's Blocks (elem_ids ``sd_trainer_*``; the WebUI wraps it in ``#tab_sd_trainer``)."""
    h = _Handlers(info, backend)
    comps: dict[str, gr.components.Component] = {}
    accordions: dict[str, gr.Accordion] = {}

    def fields_of(group: str) -> None:
        keys = next(keys for gid, _, keys in GROUPS if gid == group)
        for row in rows_of(keys):
            checks = all(SPECS[k].kind is bool for k in row)
            with gr.Row(variant="compact", elem_classes=["sd-trainer-checks"] if checks else None):
                for key in row:
                    comps[key] = _component(SPECS[key], info.defaults.get(key, SPECS[key].default))

    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Row():
            host = gr.HTML(render.message(f"Training uses the checkpoint loaded in the WebUI ({labels_text('/')}). "
                                          "Press Check to see whether it can be trained here and to get its "
                                          "presets."),
                           elem_id="sd_trainer_host")
            check = gr.Button("Check loaded model", elem_id="sd_trainer_check", scale=0)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, elem_id="sd_trainer_settings"):
                with gr.Row():
                    method = gr.Radio(METHOD_CHOICES, value=methods.DEFAULT_METHOD, label="Method",
                                      elem_id="sd_trainer_method",
                                      info="LoRA: small added layers, a file for the Lora folder; Embedding: new "
                                           "word vectors (textual inversion)")
                    preset = gr.Dropdown(preset_choices(None, methods.DEFAULT_METHOD), value=NO_PRESET,
                                         label="Preset (subject · GPU memory)", elem_id="sd_trainer_preset",
                                         info="≈: the estimated peak for the loaded model (Check loaded model) and "
                                              "this method; None keeps the settings")
                    apply_preset = gr.Button("Apply preset", elem_id="sd_trainer_apply_preset", scale=0)
                with gr.Accordion("Dataset", open=True, elem_id="sd_trainer_group_dataset"):
                    fields_of("dataset")
                    if backend.preprocess is not None and backend.upload is not None:
                        build_preprocess_panel(backend.preprocess, backend.upload, comps["data.train_dir"],
                                               wrap_gpu_call=backend.wrap_gpu_call, upscalers=info.upscalers,
                                               backend_interrupt=backend.interrupt_preprocess)
                    scan = gr.Button("Scan", elem_id="sd_trainer_scan")
                    report = gr.HTML(elem_id="sd_trainer_report")
                    gallery = gr.Gallery(label="First images and captions", elem_id="sd_trainer_dataset_gallery",
                                         columns=6, height="auto", show_label=True)
                    scan_state = gr.State(None)
                    captions = build_captions_panel(comps["data.train_dir"], comps["data.reg_dir"],
                                                    comps["data.caption_extension"], roots=backend.dataset_roots)
                for gid, title, _ in GROUPS:
                    if gid == "dataset":
                        continue
                    # the method radio starts at the default method
                    shown = METHOD_GROUPS.get(gid, methods.DEFAULT_METHOD) == methods.DEFAULT_METHOD
                    with gr.Accordion(title, open=gid in ("network", "output"), visible=shown,
                                      elem_id=f"sd_trainer_group_{gid}") as acc:
                        fields_of(gid)
                    accordions[gid] = acc
                with gr.Accordion("Config file", open=False, elem_id="sd_trainer_group_config"):
                    with gr.Row():
                        config_path = gr.Textbox(label="Config file (.json or .toml)",
                                                 elem_id="sd_trainer_config_path")
                        save = gr.Button("Save", elem_id="sd_trainer_config_save", scale=0)
                        load = gr.Button("Load", elem_id="sd_trainer_config_load", scale=0)
                    with gr.Row():
                        run_path = gr.Textbox(label="Load settings from a finished run (its LoRA file or folder)",
                                              placeholder=str(Path(info.lora_dir) / "NAME" / "NAME.safetensors"),
                                              elem_id="sd_trainer_run_path")
                        load_run = gr.Button("Load settings", elem_id="sd_trainer_run_load", scale=0)
                    config_msg = gr.HTML(elem_id="sd_trainer_config_msg")
            with gr.Column(scale=2, elem_id="sd_trainer_run"):
                task_id = gr.Textbox(visible=False, elem_id="sd_trainer_task_id")
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="sd_trainer_train")
                    interrupt = gr.Button("Interrupt", elem_id="sd_trainer_interrupt")
                    refresh = gr.Button("Job status", elem_id="sd_trainer_refresh")
                with gr.Row():
                    resume_dir = gr.Textbox(label="Resume state folder (.NAME-state or the run's output folder)",
                                            elem_id="sd_trainer_resume_dir")
                    resume = gr.Button("Resume", elem_id="sd_trainer_resume", scale=0)
                estimate_box = gr.HTML(render.message("The estimate appears when settings change or after Scan."),
                                       elem_id="sd_trainer_estimate")
                gr.HTML(elem_id="sd_trainer_progress")  # sd_trainer_start's progress callback writes here
                output = gr.HTML(elem_id="sd_trainer_output")
                job = gr.HTML(elem_id="sd_trainer_job")
                samples = gr.Gallery(label="Newest samples", elem_id="sd_trainer_samples", columns=4,
                                     height="auto")

        fields = [comps[k] for k in KEYS]
        method_groups = [accordions[g] for g in METHOD_GROUPS]
        check.click(fn=h.check_host, inputs=[method], outputs=[host, preset, *fields])
        apply_preset.click(fn=h.apply_preset, inputs=[preset, method], outputs=fields)
        method.change(fn=h.method_changed, inputs=[method, *fields], outputs=method_groups + fields + [preset])
        rates = [comps["optim.lr"], comps["optim.te_lr"]]
        comps["optim.optimizer"].input(fn=h.optimizer_changed, inputs=[method, comps["optim.optimizer"], *rates],
                                       outputs=rates)
        scan.click(fn=h.scan, inputs=[method, *fields], outputs=[report, gallery, scan_state, estimate_box])
        for event in captions.changed:  # Apply / Undo: the scan and the step formula again
            event.then(fn=h.scan, inputs=[method, *fields], outputs=[report, gallery, scan_state, estimate_box])
        for key in ESTIMATE_KEYS:
            comps[key].change(fn=h.estimate, inputs=[scan_state, method, *fields], outputs=[estimate_box],
                              show_progress=False)
        method.change(fn=h.estimate, inputs=[scan_state, method, *fields], outputs=[estimate_box],
                      show_progress=False)
        save.click(fn=h.save_config, inputs=[config_path, method, *fields], outputs=[config_msg])
        load.click(fn=h.load_config, inputs=[config_path], outputs=[method, *fields, config_msg])
        load_run.click(fn=h.load_run, inputs=[run_path], outputs=[method, *fields, config_msg])
        train.click(fn=backend.wrap_gpu_call(h.train, extra_outputs=[]), inputs=[task_id, method, *fields],
                    outputs=[output], **js_kwarg("sd_trainer_start"))
        resume.click(fn=backend.wrap_gpu_call(h.resume, extra_outputs=[]), inputs=[task_id, resume_dir],
                     outputs=[output], **js_kwarg("sd_trainer_start"))
        interrupt.click(fn=h.interrupt, inputs=[], outputs=[job])
        refresh.click(fn=h.status, inputs=[], outputs=[job, samples], show_progress=False)
    return blocks
