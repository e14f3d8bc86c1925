"""The Trainer tab, built with plain gradio 3.41.2 (no WebUI): components, presets, the UI → config mapping and
the event wiring. The backend is a recording fake; the real one is exercised by the real-WebUI tests."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from helpers import save_image, write_caption  # noqa: E402

from lib_train.config import SECTIONS, SETTINGS, TrainConfig, default_config, from_dict, save_config, \
    validate  # noqa: E402
from lib_train.errors import ConfigError, Problem  # noqa: E402
from lib_train.webui.tab import build as ui  # noqa: E402
from lib_train.webui.tab import fields as ui_fields  # noqa: E402
from lib_train.webui.tab import presets as ui_presets  # noqa: E402
from lib_train.webui.jobs import JobStatus  # noqa: E402


class FakeBackend:
    """Records what the tab asks of the WebUI."""

    def __init__(self, create_error: Exception | None = None):
        self.created: list[tuple[dict | None, str | None]] = []
        self.wrapped: list = []
        self.create_error = create_error

    def wrap(self, fn, extra_outputs=None):
        self.wrapped.append((fn, extra_outputs))
        return fn

    def create(self, data=None, *, resume_dir=None):
        if self.create_error:
            raise self.create_error
        self.created.append((data, resume_dir))
        return "job"

    def run(self, job):
        status = JobStatus(id="abc", method="lora", name="<me>", output_dir="/out", state="finished", step=2,
                           total_steps=2, loss=0.125, saved=["/out/me.safetensors"])
        return dataclasses.asdict(status)

    def backend(self) -> ui.Backend:
        return ui.Backend(wrap_gpu_call=self.wrap, create_job=self.create, run_job=self.run,
                          interrupt=lambda: None, latest_status=lambda: None,
                          host_status=lambda: (False, "no <model>"),
                          default_output_dir=lambda method, name: f"/{method}s/sub/{name}")


@pytest.fixture(scope="module")
def built():
    fake = FakeBackend()
    blocks = ui.build_ui(ui.WebuiInfo(lora_dir="/loras"), fake.backend())
    by_id = {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    return blocks, by_id, fake


def _dependency(blocks, button):
    deps = [(i, d) for i, d in enumerate(blocks.dependencies) if button._id in d["targets"]]
    assert len(deps) == 1
    return deps[0]


def _handlers(fake: FakeBackend) -> ui._Handlers:
    return ui._Handlers(ui.WebuiInfo(lora_dir="/loras"), fake.backend())


def _custom_config() -> TrainConfig:
    cfg = default_config("lora")
    for key, value in {"network.rank": 32, "network.alpha": 4.5, "optim.lr": 3e-4, "optim.scheduler": "cosine",
                       "data.train_dir": "/d", "data.flip": True, "data.max_token_length": 150,
                       "train.gradient_checkpointing": True, "output.name": "me", "output.comment": "x y",
                       "embedding.template": "/t/my.txt", "data.caption_dropout": 0.1}.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def test_every_config_field_has_exactly_one_component(built):
    _, by_id, _ = built
    cfg = TrainConfig()
    keys = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))]
    assert set(ui_fields.NOT_IN_UI) <= set(keys)
    expected = [k for k in keys if k not in ui_fields.NOT_IN_UI]
    assert sorted(ui_fields.KEYS) == sorted(expected)
    grouped = [k for _, _, group in ui_fields.GROUPS for k in group]
    assert sorted(grouped) == sorted(expected)  # each field in exactly one accordion
    field_ids = {"sd_trainer_" + k.replace(".", "_") for k in expected}
    assert field_ids <= set(by_id)
    for key in expected:
        comp = by_id["sd_trainer_" + key.replace(".", "_")]
        spec = ui_fields.SPECS[key]
        assert comp.value == spec.default, key
        assert comp.info, f"{key} has no help text"
        kind = gr.Checkbox if spec.kind is bool else gr.Radio if spec.radio else gr.Dropdown if spec.choices else \
            gr.Slider if spec.slider else gr.Number if spec.kind in (int, float) else gr.Textbox
        assert type(comp) is kind, key  # the WebUI's ui-config.json keeps values of these exact types only
        if spec.choices:  # the value is one of the choices as the browser gets them (else it shows an empty box)
            shown = [value for _, value in comp.choices] if spec.radio else comp.choices
            assert comp.postprocess(spec.default) in shown, key


def _setting_method(key: str) -> str:
    from lib_train import methods

    owner = methods.method_of(key.split(".")[0])  # a method's own section counts for that method only
    return owner.name if owner else next(m for m in methods.METHODS if SETTINGS[key].applies_to(m))


# Settings checked only when another one makes them count: that one's value while checking them.
_CHECKED_WHEN = {"network.conv_alpha": ("network.conv_rank", 4)}


def _refused(key: str, value) -> list[str]:
    """The settings validate() names for the defaults of the setting's method with ``key`` = ``value``."""
    cfg = default_config(_setting_method(key))
    cfg.data.train_dir, cfg.output.output_dir, cfg.output.name = str(Path(__file__).parent), "/tmp/out", "me"
    for k, v in [_CHECKED_WHEN.get(key, ("output.name", "me")), (key, value)]:
        section, name = k.split(".")
        setattr(getattr(cfg, section), name, v)
    try:
        validate(cfg, headless=False)
    except ConfigError as e:
        return [p.where.split(" ")[0] for p in e.problems]
    return []


def test_number_inputs_take_their_range_from_the_declared_limits(built):
    """Every number setting in the tab: its input's minimum/maximum are the setting's declared range (an open end
    none), a closed range of few steps is a slider as in the WebUI; and the declared range is what validate()
    enforces: the defaults lie in it, a step past either end is refused, naming that setting."""
    _, by_id, _ = built
    numbers = [k for k in ui_fields.KEYS if ui_fields.SPECS[k].kind in (int, float) and not ui_fields.SPECS[k].choices]
    assert len(numbers) > 30
    for key in numbers:
        spec, comp = ui_fields.SPECS[key], by_id["sd_trainer_" + key.replace(".", "_")]
        low, high = SETTINGS[key].range or (None, None)
        assert comp.minimum == (None if low is None or math.isinf(low) else low), key
        assert comp.maximum == (None if high is None or math.isinf(high) else high), key
        assert comp.step == spec.step and spec.step > 0, key
        assert isinstance(comp, gr.Slider) == (comp.minimum is not None and comp.maximum is not None), key
        if SETTINGS[key].range is None:
            continue
        assert not _refused(key, spec.default) and low <= spec.default <= high, key
        assert key in _refused(key, spec.kind(low - spec.step)), key
        if not math.isinf(high):
            assert key in _refused(key, spec.kind(high + spec.step)), key
    unbounded = [k for k in numbers if SETTINGS[k].range is None]
    assert sorted(unbounded) == ["optim.power", "sample.seed", "train.seed"]  # any value is a valid one


def test_a_typed_number_past_its_range_is_named_by_the_validation(built):
    """The browser's number input only hints its range: a value typed past it reaches the handlers (gradio's own
    check would fail every event with a message naming no setting) and the validation names it."""
    _, by_id, _ = built
    rank = by_id["sd_trainer_network_conv_rank"]
    assert rank.minimum == 0 and rank.preprocess(-3) == -3 and rank.preprocess(None) is None
    values = ui_fields.config_to_values(default_config("lora"))
    values[ui_fields.KEYS.index("network.conv_rank")] = rank.preprocess(-3)
    html = _handlers(FakeBackend()).estimate(None, "lora", *values)
    assert "GPU memory" in html or "network.conv_rank" in html  # no exception
    fake = FakeBackend(create_error=None)
    values[ui_fields.KEYS.index("output.name")] = "me"
    cfg = from_dict(ui_fields.values_to_dict("lora", values))
    with pytest.raises(ConfigError, match=r"network\.conv_rank \(--conv-rank\): must be 0 \(off\)"):
        validate(cfg, headless=False)
    assert by_id["sd_trainer_train_batch_size"].preprocess(2.0) == 2  # precision 0: an int, as the config wants


def test_method_radio_shows_labels_and_sends_the_method_names(built):
    _, by_id, _ = built
    radio = by_id["sd_trainer_method"]
    assert radio.choices == [("LoRA", "lora"), ("Embedding", "embedding")]
    assert radio.value == "lora" and radio.preprocess("embedding") == "embedding"


def test_each_method_shows_its_own_help(built):
    """Switching the method rewords the help that differs (where an embedding's files go, its learning rate) and
    back; fields worded alike get no info update."""
    _, by_id, _ = built
    out = by_id["sd_trainer_output_output_dir"]
    assert "Lora folder" in out.info and out.label == "Output folder"
    h = _handlers(FakeBackend())
    updates = h.method_changed("embedding", *ui_fields.config_to_values(default_config("lora")))
    infos = {k: u["info"] for k, u in zip(ui_fields.KEYS, updates[len(ui_fields.METHOD_GROUPS):]) if "info" in u}
    assert "embeddings folder" in infos["output.output_dir"] and "embedding vectors" in infos["optim.lr"]
    assert "network.rank" not in infos and "data.train_dir" not in infos
    back = h.method_changed("lora", *ui_fields.config_to_values(default_config("embedding")))
    infos = {k: u["info"] for k, u in zip(ui_fields.KEYS, back[len(ui_fields.METHOD_GROUPS):]) if "info" in u}
    assert infos["output.output_dir"] == out.info


def test_a_setting_of_one_method_shows_for_that_method_only(built):
    """The settings another method ignores (regularization images, the text-encoder rate, trigger words) hide
    when it is chosen and show again on the way back; the others keep showing."""
    _, by_id, _ = built
    some = {k for k in ui_fields.KEYS if SETTINGS[k].methods is not None}
    assert {"data.reg_dir", "optim.te_lr", "output.trigger_words"} <= some
    h = _handlers(FakeBackend())
    for method in ("embedding", "lora"):
        updates = h.method_changed(method, *ui_fields.config_to_values(default_config("lora")))
        shown = {k: u["visible"] for k, u in zip(ui_fields.KEYS, updates[len(ui_fields.METHOD_GROUPS):])
                 if "visible" in u}
        assert shown == {k: method in SETTINGS[k].methods for k in some}, method
    for key in ui_fields.KEYS:
        assert by_id["sd_trainer_" + key.replace(".", "_")].visible == SETTINGS[key].applies_to("lora"), key


def _rows(blocks) -> list[list]:
    """The field components of each row of the tab, in order."""
    found = []

    def walk(block):
        children = getattr(block, "children", None) or []
        fields = [c for c in children if (getattr(c, "elem_id", None) or "").replace("sd_trainer_", "", 1)
                  .replace("_", ".", 1) in ui_fields.SPECS]
        if isinstance(block, gr.Row) and fields:
            found.append(fields)
        for c in children:
            walk(c)

    walk(blocks)
    return found


def test_fields_sit_in_rows_without_a_lone_small_field(built):
    """Each accordion's fields in rows (the WebUI's form layout): checkboxes in rows of their own; at most four
    inputs to a row (a slider counts twice); a small input never alone across a row; every field in exactly one
    row."""
    blocks, _, _ = built
    rows = _rows(blocks)
    keys = [c.elem_id.replace("sd_trainer_", "", 1).replace("_", ".", 1) for row in rows for c in row]
    assert sorted(keys) == sorted(ui_fields.KEYS)
    for row in rows:
        specs = [ui_fields.SPECS[c.elem_id.replace("sd_trainer_", "", 1).replace("_", ".", 1)] for c in row]
        kinds = {s.kind is bool for s in specs}
        assert len(kinds) == 1, [s.key for s in specs]  # checkboxes never share a row with boxes
        assert sum(2 if s.slider else 1 for s in specs) <= 4, [s.key for s in specs]  # a slider needs room
        if not specs[0].kind is bool and len(row) == 1:
            assert specs[0].wide, f"{specs[0].key} sits alone across a row"


def test_field_defaults_are_the_config_defaults():
    cfg = default_config("lora")
    assert from_dict(ui_fields.values_to_dict("lora", ui_fields.config_to_values(cfg))) == cfg


def test_presets_name_existing_fields_with_valid_values():
    assert len(ui_presets.PRESETS) == len(ui_presets.SUBJECTS) * len(ui_presets.VRAM_TIERS) == 12
    for name, preset in ui_presets.PRESETS.items():
        for key, value in preset.items():
            spec = ui_fields.SPECS[key]  # KeyError = a preset names a field the tab does not have
            assert isinstance(value, spec.kind), (name, key)
            if spec.choices:
                assert value in spec.choices, (name, key)
        values = ui_fields.config_to_values(default_config("lora"))
        values = [preset.get(k, v) for k, v in zip(ui_fields.KEYS, values)]
        cfg = from_dict(ui_fields.values_to_dict("lora", values))
        assert cfg.network.rank == preset["network.rank"]


def test_each_preset_fits_its_memory_tier_by_the_estimate():
    from lib_train.estimate import estimate

    for name, preset in ui_presets.PRESETS.items():
        tier_gb = float(name.split("·")[1].split()[0])
        values = [preset.get(k, v) for k, v in zip(ui_fields.KEYS, ui_fields.config_to_values(default_config()))]
        cfg = from_dict(ui_fields.values_to_dict("lora", values))
        est = estimate(cfg, 1000)
        assert est.vram_gib * 2**30 / 1e9 < 0.85 * tier_gb, (name, est.vram_gib)  # headroom for the estimate's error
        if tier_gb > 6:
            smaller = [t for t in ui_presets.VRAM_TIERS if float(t.split()[0]) < tier_gb][-1]
            cheaper = ui_presets.PRESETS[name.replace(name.split("·")[1].strip(), smaller)]
            values = [cheaper.get(k, v) for k, v in zip(ui_fields.KEYS, ui_fields.config_to_values(default_config()))]
            assert estimate(from_dict(ui_fields.values_to_dict("lora", values)), 1000).vram_gib <= est.vram_gib


def test_a_preset_keeps_an_embeddings_learning_rate_and_leaves_the_network():
    name = "character · 6 GB"
    updates = ui._Handlers.apply_preset(name, "embedding")
    changed = {k: u["value"] for k, u in zip(ui_fields.KEYS, updates) if "value" in u}
    assert changed["train.gradient_checkpointing"] is True and changed["optim.optimizer"] == "AdamW8bit"
    assert "optim.lr" not in changed and not any(k.startswith("network.") for k in changed)


def test_apply_preset_updates_only_the_preset_fields():
    name = "style · 24 GB"
    updates = ui._Handlers.apply_preset(name)
    changed = {k: u["value"] for k, u in zip(ui_fields.KEYS, updates) if "value" in u}
    assert changed == ui_presets.PRESETS[name]


def test_the_preset_dropdown_starts_at_none_and_none_changes_no_field(built):
    """The dropdown starts at "None" (the WebUI's convention for "nothing chosen", as its Script dropdown), offered
    first; applying it, an empty choice or an unknown one leaves every field as it is."""
    blocks, by_id, _ = built
    dropdown = by_id["sd_trainer_preset"]
    assert dropdown.value == ui_presets.NO_PRESET and dropdown.choices[0] == ui_presets.NO_PRESET
    i, dep = _dependency(blocks, by_id["sd_trainer_apply_preset"])
    assert dep["inputs"] == [dropdown._id, by_id["sd_trainer_method"]._id]
    for choice in (ui_presets.NO_PRESET, None, "", "no such preset · 8 GB (≈ 1.0 GB)"):
        for method in ("lora", "embedding"):
            updates = blocks.fns[i].fn(choice, method)
            assert len(updates) == len(ui_fields.KEYS) and not any("value" in u for u in updates), (choice, method)


def test_a_preset_label_shows_its_predicted_peak_and_applies_the_same_preset(built):
    """Each choice is "NAME (≈ X GB)" with X the estimate's peak for the family and method; choosing it applies
    exactly preset NAME (the same fields as choosing it by name)."""
    from lib_train.estimate import estimate

    _, by_id, _ = built
    assert by_id["sd_trainer_preset"].choices == ui_presets.preset_choices(None)
    for family in (None, "sd2", "sdxl"):
        for method in ("lora", "embedding"):
            choices = ui_presets.preset_choices(family, method)
            assert choices[0] == ui_presets.NO_PRESET and len(choices) == len(ui_presets.presets_for(family, method)) + 1
            for choice in choices[1:]:
                name = ui_presets.preset_name(choice)
                gib = estimate(ui_presets.preset_config(name, method), None, family or "sd1").vram_gib
                assert choice == f"{name} (≈ {gib:.1f} GB)"
                by_label = ui._Handlers.apply_preset(choice, method)
                assert by_label == ui._Handlers.apply_preset(name, method)
                assert any("value" in u for u in by_label)


def test_ui_values_round_trip_through_the_components(built):
    """config → each component's postprocess (shown) → preprocess (sent back) → config dict → same config."""
    _, by_id, _ = built
    cfg = _custom_config()
    values = []
    for key, value in zip(ui_fields.KEYS, ui_fields.config_to_values(cfg)):
        comp = by_id["sd_trainer_" + key.replace(".", "_")]
        values.append(comp.preprocess(comp.postprocess(value)))
    data = ui_fields.values_to_dict("lora", values)
    json.dumps(data)  # plain types only
    assert from_dict(data) == cfg


def test_train_button_wiring(built):
    blocks, by_id, fake = built
    i, dep = _dependency(blocks, by_id["sd_trainer_train"])
    assert dep["inputs"][0] == by_id["sd_trainer_task_id"]._id
    assert dep["inputs"][1] == by_id["sd_trainer_method"]._id
    assert dep["inputs"][2:] == [by_id["sd_trainer_" + k.replace(".", "_")]._id for k in ui_fields.KEYS]
    assert dep["outputs"] == [by_id["sd_trainer_output"]._id]
    assert dep["js"] == "sd_trainer_start"
    assert blocks.fns[i].fn in [fn for fn, _ in fake.wrapped]  # went through wrap_gradio_gpu_call
    _, resume = _dependency(blocks, by_id["sd_trainer_resume"])
    assert resume["js"] == "sd_trainer_start"
    assert resume["inputs"] == [by_id["sd_trainer_task_id"]._id, by_id["sd_trainer_resume_dir"]._id]
    js = (Path(__file__).resolve().parents[1] / "javascript" / "trainer.js").read_text()
    assert "function sd_trainer_start(" in js and "requestProgress(" in js and "'sd_trainer_output'" in js


def test_train_click_sends_a_config_the_backend_accepts():
    fake = FakeBackend()
    values = ui_fields.config_to_values(_custom_config())
    (html,) = _handlers(fake).train("task(x1)", "lora", *values)
    (data, resume_dir), = fake.created
    assert resume_dir is None
    cfg = from_dict(data)
    assert cfg.network.rank == 32
    assert cfg.output.output_dir == "/loras/sub/me"  # an empty output folder → the settings' subfolder default
    # one line under the buttons: the job panel (refreshed by javascript/trainer.js) holds the details, once
    assert "Finished the lora run &lt;me&gt;: /out/me.safetensors" in html and "<table" not in html


def test_backend_refusal_is_shown_not_raised():
    refusal = ConfigError([Problem("output.name", "an embedding named 'me' is already loaded from /e/me.pt")])
    fake = FakeBackend(create_error=refusal)
    (html,) = _handlers(fake).train("task(x)", "embedding", *ui_fields.config_to_values(default_config("embedding")))
    assert "output.name" in html and "already loaded from /e/me.pt" in html and "sd-trainer-error" in html
    (html,) = _handlers(FakeBackend()).resume("task(y)", "  ")
    assert "resume-state folder" in html


def test_embedding_runs_default_to_the_embeddings_folder():
    fake = FakeBackend()
    values = ui_fields.config_to_values(default_config("embedding"))
    values[ui_fields.KEYS.index("output.name")] = "me"
    _handlers(fake).train("task(x2)", "embedding", *values)
    (data, _), = fake.created
    cfg = from_dict(data)
    assert cfg.method == "embedding" and cfg.output.output_dir == "/embeddings/sub/me"


def test_resume_passes_the_state_folder():
    fake = FakeBackend()
    _handlers(fake).resume("task(y)", " /out/.me-state ")
    assert fake.created == [(None, "/out/.me-state")]


def test_method_switch_swaps_method_defaults_and_sections():
    lora = ui_fields.config_to_values(default_config("lora"))
    updates = _handlers(FakeBackend()).method_changed("embedding", *lora)
    shown = {g: u["visible"] for g, u in zip(ui_fields.METHOD_GROUPS, updates)}
    assert shown == {"network": False, "embedding": True}
    changed = {k: u["value"] for k, u in zip(ui_fields.KEYS, updates[len(shown):]) if "value" in u}
    assert changed == {"optim.lr": 5e-3, "output.save_precision": "fp32"}
    custom = list(lora)
    custom[ui_fields.KEYS.index("optim.lr")] = 2e-4  # a value the user chose stays
    changed = {k: u["value"] for k, u in zip(ui_fields.KEYS, _handlers(FakeBackend()).method_changed("embedding", *custom)[2:])
               if "value" in u}
    assert "optim.lr" not in changed


def test_scan_reports_counts_formula_and_gallery(tmp_path):
    for i in range(3):
        save_image(tmp_path / "5_cat" / f"{i}.png", (96, 64), seed=i)
        write_caption(tmp_path / "5_cat" / f"{i}.txt", f"cat <{i}>")
    values = ui_fields.config_to_values(default_config("lora"))
    values[ui_fields.KEYS.index("data.train_dir")] = str(tmp_path)
    h = _handlers(FakeBackend())
    html, gallery, scan, estimate = h.scan("lora", *values)
    assert "5_cat" in html and "Steps:" in html and "150" in html  # 3 images × 5 repeats × 10 epochs
    assert sorted(caption for _, caption in gallery) == ["cat <0>", "cat <1>", "cat <2>"]
    assert "= 150 steps" in estimate and "GPU memory ≈" in estimate

    # the live estimate recounts from the kept scan as settings change, without reading the folder again
    values[ui_fields.KEYS.index("train.epochs")] = 4
    values[ui_fields.KEYS.index("train.gradient_checkpointing")] = True
    live = h.estimate(scan, "lora", *values)
    assert "= 60 steps" in live and _gb(live) < _gb(estimate)
    values[ui_fields.KEYS.index("train.batch_size")] = 0  # mid-edit: the memory figure stays, no traceback
    assert "GPU memory" in h.estimate(scan, "lora", *values)
    values[ui_fields.KEYS.index("train.batch_size")] = 1
    assert "press Scan" in h.estimate(None, "lora", *values)

    save_image(tmp_path / "5_cat" / "tiny.png", (16, 16))
    (tmp_path / "5_cat" / "broken.png").write_bytes(b"not a png")
    html, gallery, scan, _ = h.scan("lora", *values)
    assert "tiny.png" in html and "broken.png" in html and "Steps:" not in html and gallery == [] and scan is None

    values[ui_fields.KEYS.index("data.train_dir")] = ""
    html, *_ = h.scan("lora", *values)
    assert "data.train_dir" in html


def _gb(html: str) -> float:
    import re

    return float(re.search(r"GPU memory ≈ <b>([0-9.]+) GB", html).group(1))


def test_status_shows_the_loss_curve_and_samples(tmp_path):
    sample = tmp_path / "me-000004-0.png"
    save_image(sample, (64, 64))
    status = dataclasses.asdict(JobStatus(id="j", method="lora", name="me", output_dir="/o", state="running",
                                          loss_history=[[1, 0.5], [2, 0.25], [3, 0.4]], samples=[str(sample)],
                                          sample_step=4))
    fake = FakeBackend()
    backend = dataclasses.replace(fake.backend(), latest_status=lambda: status)
    html, shown = ui._Handlers(ui.WebuiInfo(lora_dir="/l"), backend).status()
    assert "<svg class='sd-trainer-loss'" in html and "0.500" in html and "0.250" in html
    assert shown == [str(sample)] and "Samples of step 4" in html and "Epoch × weight grid" not in html
    status.update(state="finished", saved=["/o/me-000001.safetensors", "/o/me.safetensors"])
    html, _ = ui._Handlers(ui.WebuiInfo(lora_dir="/l"), backend).status()
    assert "Epoch × weight grid (training run: me)" in html  # where to compare the saved epochs


def test_config_save_load_and_finished_run(tmp_path):
    h = _handlers(FakeBackend())
    cfg = _custom_config()
    msg = h.save_config(str(tmp_path / "c.toml"), "lora", *ui_fields.config_to_values(cfg))
    assert "Saved" in msg
    method, *values, msg = h.load_config(str(tmp_path / "c.toml"))
    assert method == "lora" and from_dict(ui_fields.values_to_dict(method, values)) == cfg
    assert "sd-trainer-error" in h.save_config(str(tmp_path / "c.yaml"), "lora", *values)

    run = tmp_path / "run"
    save_config(cfg, run / "me.config.json")
    for given in (run / "me-000003.safetensors", run / "me-step00000020.safetensors", run / "me.safetensors", run):
        assert ui.config_file_for_run(str(given)) == run / "me.config.json"
    method, *values, msg = h.load_run(str(run / "me-000003.safetensors"))
    assert from_dict(ui_fields.values_to_dict(method, values)) == cfg and "me.config.json" in msg
    *_, msg = h.load_run(str(tmp_path / "elsewhere" / "x.safetensors"))
    assert "No settings file" in msg


def test_js_keyword_follows_gradio_major(monkeypatch):
    assert ui.js_kwarg("f") == {"_js": "f"}
    monkeypatch.setattr(gr, "__version__", "4.40.0")
    assert ui.js_kwarg("f") == {"js": "f"}


def test_tab_is_distinct_from_the_builtin_train_tab():
    from lib_train.webui.tab import backend as ui_webui

    label, elem_id = ui_webui.TAB
    assert label != "Train" and elem_id != "train" and elem_id == "sd_trainer"  # style.css scopes #tab_sd_trainer
    css = (Path(__file__).resolve().parents[1] / "style.css").read_text()
    rules = [line for line in css.splitlines() if line.strip() and not line.startswith(("/*", " ", "}"))]
    assert rules and all(r.startswith("#tab_sd_trainer") for r in rules)


def test_settings_defaults_become_the_initial_values():
    blocks = ui.build_ui(ui.WebuiInfo(lora_dir="/l", defaults={"sample.prompts": "a photo of [name]",
                                                               "sample.every_epochs": 2, "train.offload_vae": False}),
                         FakeBackend().backend())
    by_id = {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["sd_trainer_sample_prompts"].value == "a photo of [name]"
    assert by_id["sd_trainer_sample_every_epochs"].value == 2
    assert by_id["sd_trainer_train_offload_vae"].value is False
    assert by_id["sd_trainer_train_epochs"].value == 10  # untouched fields keep the config default


def test_a_shared_webui_keeps_config_files_in_its_folders(tmp_path):
    fake = FakeBackend()
    backend = dataclasses.replace(fake.backend(), allowed_roots=lambda: [str(tmp_path / "Lora")])
    h = ui._Handlers(ui.WebuiInfo(lora_dir="/l"), backend)
    values = ui_fields.config_to_values(default_config())
    assert "--hide-ui-dir-config" in h.save_config("/tmp/evil.json", "lora", *values)
    assert not Path("/tmp/evil.json").exists()
    assert "Saved" in h.save_config(str(tmp_path / "Lora" / "c.json"), "lora", *values)
    *_, msg = h.load_config("/etc/passwd.json")
    assert "--hide-ui-dir-config" in msg
    *_, msg = h.load_config(str(tmp_path / "Lora" / "c.json"))
    assert "Loaded" in msg



@pytest.mark.parametrize("family, ok", [("sdxl", True), ("sd1", True), ("sdxl", False)])
def test_check_loaded_model_offers_the_family_presets_and_defaults(family, ok):
    """"Check loaded model" on an SDXL model: the SDXL presets and gradient checkpointing on (the SDXL record's
    config default); on SD1 the SD presets and no field changed; a model that cannot be trained changes no field."""
    fake = FakeBackend()
    backend = dataclasses.replace(fake.backend(), host_status=lambda: (ok, "Loaded: x."), model_family=lambda: family)
    html, presets, *updates = ui._Handlers(ui.WebuiInfo(lora_dir="/loras"), backend).check_host()
    assert presets["choices"] == ui_presets.preset_choices(family) and presets["value"] == ui_presets.NO_PRESET
    assert [ui_presets.preset_name(c) for c in presets["choices"][1:]] == list(ui_presets.presets_for(family))
    changed = {k: u["value"] for k, u in zip(ui_fields.KEYS, updates) if "value" in u}
    if family == "sdxl" and ok:
        assert all(n.startswith("SDXL") for n in presets["choices"][1:])
        assert changed == {"train.gradient_checkpointing": True} and "Gradient checkpointing" in html
    else:
        assert changed == {}
    if family == "sd1":
        assert not any(n.startswith("SDXL") for n in presets["choices"])


def test_the_preset_list_follows_the_method_on_sdxl():
    """Switching to Embedding with an SDXL model loaded offers only the presets an embedding run fits (no 8 GB);
    Check with Embedding chosen does the same; back to LoRA, all of them."""
    fake = FakeBackend()
    backend = dataclasses.replace(fake.backend(), host_status=lambda: (True, "Loaded: x."), model_family=lambda: "sdxl")
    h = ui._Handlers(ui.WebuiInfo(lora_dir="/loras"), backend)
    lora = ui_fields.config_to_values(default_config("lora"))
    emb_presets = h.method_changed("embedding", *lora)[-1]
    assert emb_presets["choices"] == ui_presets.preset_choices("sdxl", "embedding")
    assert emb_presets["value"] == ui_presets.NO_PRESET
    names = [ui_presets.preset_name(c) for c in emb_presets["choices"][1:]]
    assert names == list(ui_presets.presets_for("sdxl", "embedding"))
    assert names and not any(n.endswith("8 GB") for n in names)
    assert h.check_host("embedding")[1]["choices"] == emb_presets["choices"]
    emb = ui_fields.config_to_values(default_config("embedding"))
    assert h.method_changed("lora", *emb)[-1]["choices"] == ui_presets.preset_choices("sdxl")


def test_the_grid_scripts_file_list_shows_once_a_run_is_chosen(tmp_path):
    """The epoch grid's "Files" list is hidden while no run is chosen (it would be an empty box under its label) and
    shown with the run's files once one is; the summary then says where runs are looked for, or names the run."""
    from test_grid import write_safetensors

    from lib_train.grid.runs import discover_runs
    from lib_train.webui.grid import ui as grid_ui

    files, keep, info = grid_ui._run_updates(gr, None, [])
    assert files["visible"] is False and files["choices"] == [] and keep["value"] is None
    assert "No training runs found" in info["value"]
    for stem in ("me-000001", "me"):
        write_safetensors(tmp_path / "me" / f"{stem}.safetensors")
    run = discover_runs(tmp_path, "lora")[0]
    files, keep, info = grid_ui._run_updates(gr, run, [run])
    assert files["visible"] is True and files["value"] == ["me-000001", "me"] and keep["value"] == "me"
    assert [value for _, value in files["choices"]] == ["me-000001", "me"] and "**me**" in info["value"]
