"""The "Prepare dataset" panel (lib_train/webui/tab/preprocess_panel.py) built with plain gradio 3.41.2 inside a Blocks,
its wiring, and its handlers run against stand-in backends (the pure preprocessing and upload code with stand-in
image operations; the WebUI's operations are tested in tests/webui/test_preprocess_webui.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from PIL import ImageOps  # noqa: E402

from helpers import save_image, write_caption  # noqa: E402
from lib_train.data.preprocess_plan import Operations, PreprocessOptions, make_plan, options_from_dict, \
    run_plan, store_uploads  # noqa: E402
from lib_train.errors import ConfigError, Problem, TrainerError  # noqa: E402
from lib_train.webui.tab import preprocess_panel as ui_preprocess  # noqa: E402
from lib_train.webui.tab.preprocess_panel import (ELEM, KEYS, START_JS, build_preprocess_panel,  # noqa: E402
                                                  values_to_options)


class Fake:
    """Records what the panel asks of the backend; runs the real plan with stand-in image operations."""

    def __init__(self, upload_root: Path | None = None, error: TrainerError | None = None):
        self.options: list[dict] = []
        self.wrapped: list = []
        self.upload_root, self.error = upload_root, error

    def wrap(self, fn, extra_outputs=None):
        self.wrapped.append((fn, extra_outputs))
        return fn

    def preprocess(self, options: dict) -> dict:
        self.options.append(options)
        if self.error:
            raise self.error
        fit = lambda im: ImageOps.fit(im, (64, 64))  # noqa: E731
        ops = Operations(resize=fit, focal=lambda im: [fit(im)], auto=fit, split=lambda im: [], flip=ImageOps.mirror)
        return run_plan(make_plan(options_from_dict(options)), ops).to_dict()

    def upload(self, files, run, repeats, concept, caption_extension):
        return store_uploads(files, self.upload_root, run, repeats=repeats, concept=concept,
                             caption_extension=caption_extension).to_dict()


@pytest.fixture(scope="module")
def built():
    fake = Fake()
    with gr.Blocks(analytics_enabled=False) as blocks:
        train_dir = gr.Textbox(label="dataset", elem_id="sd_trainer_data_train_dir")
        with gr.Column():
            build_preprocess_panel(fake.preprocess, fake.upload, train_dir, wrap_gpu_call=fake.wrap,
                                   upscalers=["None", "Lanczos", "R-ESRGAN 4x+"],
                                   backend_interrupt=lambda: fake.options.append("stop"))
    by_id = {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    return blocks, by_id, fake, train_dir


def _dependency(blocks, button):
    deps = [(i, d) for i, d in enumerate(blocks.dependencies) if button._id in d["targets"]]
    assert len(deps) == 1
    return deps[0]


def _handlers(fake: Fake) -> ui_preprocess._PanelHandlers:
    return ui_preprocess._PanelHandlers(fake.preprocess, fake.upload)


def _values(**changes) -> list:
    """The panel's default values as a user would send them (through each component), with ``changes``."""
    return [changes.get(k, v) for k, v in zip(KEYS, _default_values())]


def _default_values() -> list:
    with gr.Blocks():
        makers = ui_preprocess._fields([])
        comps = [makers[k]() for k in KEYS]
    return [c.preprocess(c.postprocess(c.value)) for c in comps]


def test_every_option_has_a_component_and_defaults_match():
    options = {f.name for f in dataclasses.fields(PreprocessOptions)}
    assert set(KEYS) - {"captioners"} | {"caption_blip", "caption_deepbooru"} == options
    assert len(KEYS) == len(set(KEYS))
    assert options_from_dict(values_to_options(_default_values())) == PreprocessOptions()


def test_panel_builds_with_every_component(built):
    blocks, by_id, _, _ = built
    for key in KEYS:
        assert ELEM + key in by_id, key
    for name in ("panel", "upload_files", "upload_run", "upload_repeats", "upload_concept", "upload", "task_id",
                 "start", "result"):
        assert ELEM + name in by_id, name
    assert by_id[ELEM + "upload_files"].file_count == "multiple"
    assert isinstance(by_id[ELEM + "panel"], gr.Accordion)
    assert by_id[ELEM + "upscaler"].choices == ["Lanczos", "None", "R-ESRGAN 4x+"]  # the default first, no repeat


def test_preprocess_button_goes_through_the_queue_and_sets_the_dataset_field(built):
    blocks, by_id, fake, train_dir = built
    i, dep = _dependency(blocks, by_id[ELEM + "start"])
    assert dep["inputs"] == [by_id[ELEM + "task_id"]._id, *[by_id[ELEM + k]._id for k in KEYS]]
    assert dep["outputs"] == [train_dir._id, by_id[ELEM + "result"]._id]  # the HTML last: the WebUI appends to it
    assert dep["js"] == START_JS
    assert "requestProgress(id" in START_JS and f"'{ELEM}result'" in START_JS and "args[0] = id" in START_JS
    fn, extra = fake.wrapped[0]
    assert blocks.fns[i].fn is fn and len(extra) == 1  # extra outputs + the error HTML = the two outputs
    i, stop = _dependency(blocks, by_id[ELEM + "stop"])
    assert stop["inputs"] == stop["outputs"] == [] and by_id[ELEM + "stop"].visible
    blocks.fns[i].fn()
    assert fake.options == ["stop"]
    _, up = _dependency(blocks, by_id[ELEM + "upload"])
    assert up["outputs"] == [by_id[ELEM + "source_dir"]._id, by_id[ELEM + "result"]._id]


def test_stop_button_only_with_an_interrupt_backend():
    with gr.Blocks(analytics_enabled=False) as blocks:
        build_preprocess_panel(Fake().preprocess, Fake().upload, gr.Textbox())
    stop = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == ELEM + "stop")
    assert not stop.visible and not [d for d in blocks.dependencies if stop._id in d["targets"]]


def test_preprocess_click_runs_and_reports(tmp_path):
    src = tmp_path / "src"
    save_image(src / "5_cat" / "a.png", (96, 64), seed=1)
    write_caption(src / "5_cat" / "a.txt", "cat <b>")
    save_image(src / "5_cat" / "b.png", (80, 80), seed=2)
    fake = Fake()
    update, html = _handlers(fake).preprocess("task(abc)", *_values(source_dir=f" {src} ", flip=True,
                                                                    captioners=["BLIP", "DeepBooru"]))
    sent = fake.options[0]
    assert sent["source_dir"] == str(src) and sent["flip"] is True
    assert sent["caption_blip"] is True and sent["caption_deepbooru"] is True
    dest = tmp_path / "src-processed"
    assert update == gr.update(value=str(dest))
    assert "2 of 2 images processed" in html and "4 image(s), 2 caption file(s)" in html
    assert "5_cat/a-flipped.png" in html
    assert sorted(p.name for p in (dest / "5_cat").iterdir()) == ["a-flipped.png", "a-flipped.txt", "a.png",
                                                                   "a.txt", "b-flipped.png", "b.png"]

    update, html = _handlers(fake).preprocess("task(abd)", *_values(source_dir=str(src)))  # dest not empty now
    assert update == gr.update() and "dest_dir" in html and "not empty" in html
    assert "sd-trainer-error" in html


def test_refusals_are_shown_not_raised():
    fake = Fake(error=ConfigError([Problem("width", "500 px is not a multiple of 8 <x>")]))
    update, html = _handlers(fake).preprocess("task(x)", *_values(source_dir="/d"))
    assert update == gr.update()
    assert "width" in html and "&lt;x&gt;" in html and "sd-trainer-error" in html
    fake = Fake(error=TrainerError("DeepBooru captions are not available: offline"))
    _, html = _handlers(fake).preprocess("task(x)", *_values(source_dir="/d"))
    assert "DeepBooru captions are not available" in html


def test_an_interrupted_run_leaves_the_dataset_field_alone():
    result = {"output_dir": "/o", "images": ["a.png"], "captions": [], "notes": ["Interrupted after 1 of 3"],
              "interrupted": True, "processed": 1, "total": 3}
    h = ui_preprocess._PanelHandlers(lambda options: result, None)
    update, html = h.preprocess("task(x)", *_values(source_dir="/d"))
    assert update == gr.update() and "Interrupted: 1 of 3" in html


def test_upload_stores_files_and_sets_the_source_folder(tmp_path):
    up = tmp_path / "up"
    save_image(up / "one.png", (80, 80))
    write_caption(up / "one.txt", "one")
    (up / "x.exe").write_bytes(b"MZ")

    class TempFile:  # what gradio 3's File component hands over
        def __init__(self, path: Path):
            self.name, self.orig_name = str(path), str(path)

    fake = Fake(upload_root=tmp_path / "data")
    h = _handlers(fake)
    files = [TempFile(up / "one.png"), TempFile(up / "one.txt"), TempFile(up / "x.exe")]
    update, html = h.upload(files, " me ", 10.0, "", ".txt")
    assert update == gr.update(value=str(tmp_path / "data" / "me"))
    assert sorted(p.name for p in (tmp_path / "data" / "me" / "10_me").iterdir()) == ["one.png", "one.txt"]
    assert "Stored 2 file(s)" in html and "x.exe" in html and "Not stored" in html

    update, html = h.upload(files, "../me", 10, "", ".txt")
    assert update == gr.update() and "run" in html and "sd-trainer-error" in html
    update, html = h.upload(None, "me", 10, "", ".txt")
    assert update == gr.update() and "Choose the images" in html


def test_options_reach_the_plan_unchanged(tmp_path):
    """Every panel value arrives as the option of the same name (a value the panel cannot set is a defect)."""
    save_image(tmp_path / "s" / "a.png")
    changed = dict(dest_dir=str(tmp_path / "d"), if_dest_exists="clear", width=256, height=320, resize="auto",
                   upscaler="R-ESRGAN 4x+", split=True, split_threshold=0.3, split_overlap=0.1, flip=True,
                   focal_face_weight=0.1, focal_entropy_weight=0.2, focal_edges_weight=0.3, focal_debug=True,
                   auto_min_side=256, auto_max_side=512, auto_min_area=4096, auto_max_area=200000,
                   auto_objective="Minimize error", auto_threshold=0.2, existing_caption="prepend",
                   caption_extension=".caption")
    opts = options_from_dict(values_to_options(_values(source_dir=str(tmp_path / "s"), captioners=["BLIP"],
                                                       **changed)))
    for key, value in changed.items():
        assert getattr(opts, key) == value, key
    assert opts.caption_blip and not opts.caption_deepbooru
    assert make_plan(opts).items[0].source.name == "a.png"


def test_result_rendering_escapes_and_truncates():
    images = [f"<{i}>.png" for i in range(20)]
    html = ui_preprocess.render_result({"output_dir": "/o<", "images": images, "captions": [], "notes": ["n<1>"],
                                        "interrupted": False, "processed": 20, "total": 20})
    assert "/o&lt;" in html and "n&lt;1&gt;" in html and "&lt;11&gt;.png" in html and "&lt;12&gt;.png" not in html
    assert "… 8 more" in html
