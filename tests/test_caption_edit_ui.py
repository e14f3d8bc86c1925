"""The "Captions" panel (lib_train/webui/tab/captions_panel.py) in the whole Trainer tab built with plain gradio
3.41.2: its components, its wiring (Apply and Undo re-run the tab's scan), and its handlers on a real dataset."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

gr = pytest.importorskip("gradio")

from helpers import save_image, write_caption  # noqa: E402
from lib_train.data import caption_edit as ce  # noqa: E402
from lib_train.webui.tab import build as ui  # noqa: E402
from lib_train.webui.tab import captions_panel as cp  # noqa: E402
from lib_train.webui.tab.captions_panel import ALL_FOLDERS, ELEM, PLAN_KEYS  # noqa: E402


def _backend(roots=None) -> ui.Backend:
    def wrap(fn, extra_outputs=None):
        return fn

    return ui.Backend(wrap_gpu_call=wrap, create_job=lambda *a, **k: None, run_job=lambda job: {},
                      interrupt=lambda: None, latest_status=lambda: None, host_status=lambda: (False, "none"),
                      default_output_dir=lambda method, name: "", dataset_roots=lambda: roots)


@pytest.fixture(scope="module")
def built():
    blocks = ui.build_ui(ui.WebuiInfo(lora_dir="/loras"), _backend())
    by_id = {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    return blocks, by_id


def _deps(blocks, component):
    """The events a click on ``component`` starts (not the ones chained after them with ``.then``)."""
    return [(i, d) for i, d in enumerate(blocks.dependencies) if component._id in d["targets"]
            and d.get("trigger_after") is None]


def test_the_panel_sits_in_the_dataset_section_with_every_input(built):
    blocks, by_id = built
    for key in (*PLAN_KEYS, "panel", "load", "legacy", "table", "preview", "apply", "undo", "status"):
        assert ELEM + key in by_id, key
    assert isinstance(by_id[ELEM + "table"], gr.Dataframe) and isinstance(by_id[ELEM + "panel"], gr.Accordion)
    dataset_ids = {c._id for c in by_id["sd_trainer_group_dataset"].children}
    assert by_id[ELEM + "panel"]._id in dataset_ids


def test_apply_and_undo_rerun_the_scan(built):
    blocks, by_id = built
    dataset_inputs = [by_id[f"sd_trainer_data_{k}"]._id for k in ("train_dir", "reg_dir", "caption_extension")]
    (scan_i, scan_dep), = _deps(blocks, by_id["sd_trainer_scan"])
    for name, with_plan in (("apply", True), ("undo", False)):
        (i, dep), = _deps(blocks, by_id[ELEM + name])
        assert dep["inputs"][:3] == dataset_inputs
        assert dep["inputs"][4:] == ([by_id[ELEM + k]._id for k in PLAN_KEYS] if with_plan else [])
        assert dep["outputs"] == [by_id[ELEM + k]._id for k in ("table", "folder", "status")]
        after = [(j, d) for j, d in enumerate(blocks.dependencies) if d.get("trigger_after") == i]
        assert len(after) == 1
        j, then = after[0]
        assert then["outputs"] == scan_dep["outputs"] and then["inputs"] == scan_dep["inputs"]
        assert blocks.fns[j].fn.__func__ is blocks.fns[scan_i].fn.__func__  # the tab's own scan handler
    (_, preview), = _deps(blocks, by_id[ELEM + "preview"])
    assert preview["outputs"] == [by_id[ELEM + "status"]._id]
    (_, pick), = _deps(blocks, by_id[ELEM + "table"])
    assert pick["outputs"] == [by_id[ELEM + "remove"]._id]


@pytest.fixture
def dataset(tmp_path):
    train = tmp_path / "train"
    save_image(train / "10_sks" / "a.png", seed=1)
    write_caption(train / "10_sks" / "a.txt", "1girl, sks, blurry, smile")
    save_image(train / "10_sks" / "b.png", seed=2)
    write_caption(train / "10_sks" / "b.txt", "sks, 1girl, watermark", "utf-16")
    save_image(train / "1_bg" / "c.png", seed=3)
    return train


def _plan(**changes):
    values = {"folder": ALL_FOLDERS, "trigger": "", "remove": "", "find": "", "replace_with": "", "mode": "tag",
              "add": "", "dedupe": False, "sort": False, "keep_first": 0, "include_uncaptioned": False}
    values.update(changes)
    return [values[k] for k in PLAN_KEYS]


def test_load_preview_apply_undo_through_the_handlers(dataset):
    h = cp._CaptionHandlers(lambda: None)
    ds = (f" {dataset} ", "", ".txt", False)
    table, folders, status = h.load(*ds)
    assert table["value"]["headers"] == ["Tag", "Images", "10_sks", "1_bg"]
    assert table["value"]["data"][:2] == [["1girl", 2, 2, 0], ["sks", 2, 2, 0]]
    assert folders["choices"] == [ALL_FOLDERS, "10_sks", "1_bg"]
    assert "3 image(s) in 2 folder(s): 2 caption(s), 1 without a caption file" in status
    assert "not plain UTF-8" in status
    plan = _plan(trigger="sks", remove="blurry, watermark", keep_first=0.0)  # gr.Number sends a float
    html = h.preview(*ds, *plan)
    assert "2 of 2 caption(s) would change" in html and "1girl, sks, blurry, smile" in html
    assert "sks, 1girl, smile" in html and "UTF-16" in html
    before = {p: p.read_bytes() for p in dataset.rglob("*.txt")}
    table, _, status = h.apply(*ds, *plan)
    assert "Wrote 2 caption(s)" in status and ce.BACKUP_DIR in status
    assert {r[0] for r in table["value"]["data"]} == {"sks", "1girl", "smile"}
    assert (dataset / "10_sks" / "b.txt").read_bytes() == b"sks, 1girl"
    table, _, status = h.undo(*ds)
    assert "Restored 2 caption(s)" in status
    assert {p: p.read_bytes() for p in dataset.rglob("*.txt") if ce.BACKUP_DIR not in p.parts} == before
    _, _, status = h.undo(*ds)
    assert "nothing to undo" in status and "sd-trainer-error" in status


def test_errors_are_shown_not_raised(dataset, tmp_path):
    h = cp._CaptionHandlers(lambda: None)
    ds = (str(dataset), "", ".txt", False)
    assert "find" in h.preview(*ds, *_plan(mode="regex", find="(")) and "regular expression" in \
        h.preview(*ds, *_plan(mode="regex", find="("))
    assert "choose an action" in h.preview(*ds, *_plan())
    table, folders, status = h.load(str(tmp_path / "missing"), "", ".txt", False)
    assert table == folders == gr.update() and "does not exist" in status
    assert "train_dir" in h.load("", "", ".txt", False)[2]
    shared = cp._CaptionHandlers(lambda: [str(tmp_path / "uploads")])
    assert "--hide-ui-dir-config" in shared.load(*ds)[2]
    assert "--hide-ui-dir-config" in shared.undo(*ds)[2]
    assert "is not a folder of this dataset" in h.preview(*ds, *_plan(folder="nope", trigger="x"))


def test_a_click_on_a_tag_adds_it_to_remove_and_a_second_takes_it_out():
    table = [["1girl", 2, 2], ["blurry", 1, 1]]
    assert cp._CaptionHandlers.pick("", table, SimpleNamespace(index=[1, 2])) == "blurry"
    assert cp._CaptionHandlers.pick("watermark", table, SimpleNamespace(index=[0, 0])) == "watermark, 1girl"
    assert cp._CaptionHandlers.pick("watermark, 1girl", table, SimpleNamespace(index=[0, 1])) == "watermark"
    assert cp._CaptionHandlers.pick("x", table, SimpleNamespace(index=[9, 0])) == "x"
