"""The Trainer tab's "Captions" panel (in the Dataset section): load every caption of the dataset, see its tags with
their counts (overall and per folder), and edit the captions in bulk — trigger word(s) first, remove tags, replace
a tag / a text / a regular expression, add a tag where missing, deduplicate, sort by frequency — with Preview, Apply
and Undo (:mod:`lib_train.data.caption_edit` does the work).

The panel reads the tab's own dataset fields (folder, regularization folder, caption extension); after Apply and
Undo the tab re-runs its scan (the dataset report and the step formula), through the events
:func:`build_captions_panel` returns. Like :mod:`.preprocess_panel`, it never imports the WebUI: the folders a
shared WebUI allows come in as a callable, so the panel builds and its handlers run with plain gradio
(tests/test_caption_edit_ui.py). Only gradio APIs present in 3.41 and 4.x are used.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import gradio as gr

from ...data import caption_edit as ce
from ...data.dataset import confined_to
from ...errors import TrainerError
from . import render

ELEM = "sd_trainer_cap_"  # elem_id prefix of the panel's components
ALL_FOLDERS = "All folders"
TABLE_HEADERS = ["Tag", "Images"]
MODE_INFO = ("tag: a whole tag (empty replacement removes it); text: plain text anywhere in the caption; regex: a "
             "Python regular expression on the caption text (\\1 refers to a group)")
PLAN_KEYS = ("folder", "trigger", "remove", "find", "replace_with", "mode", "add", "dedupe", "sort", "keep_first",
             "include_uncaptioned")
"""The panel's action inputs, in order (after the dataset fields)."""


def _e(value: Any) -> str:
    return html.escape(str(value))


def table_value(captions: ce.Captions | None) -> dict[str, Any]:
    """The tag table as the Dataframe's value: Tag, Images, then one column per folder."""
    if captions is None:
        return {"headers": TABLE_HEADERS, "data": []}
    rows = captions.tag_table()
    return {"headers": TABLE_HEADERS + list(captions.folders),
            "data": [[r["tag"], r["count"], *[r["folders"].get(f, 0) for f in captions.folders]] for r in rows]}


def render_summary(captions: ce.Captions) -> str:
    s = captions.summary()
    text = (f"{s['images']} image(s) in {len(s['folders'])} folder(s): {s['captions']} caption(s), "
            f"{s['without_caption']} without a caption file, {len(captions.tag_table())} different tags.")
    parts = [render.message(text, "ok")]
    if s["not_utf8"]:
        parts.append(render.message(f"{s['not_utf8']} caption(s) are not plain UTF-8; a caption an action changes "
                                    "is written back as UTF-8."))
    if captions.problems:
        parts.append(render.message(f"{len(captions.problems)} caption file(s) cannot be read: "
                                    + "; ".join(f"{p.where}: {p.message}" for p in captions.problems[:5]), "error"))
    return "".join(parts)


def render_preview(p: dict[str, Any]) -> str:
    head = (f"{p['changed']} of {p['considered']} caption(s) would change" + (f" ({p['created']} new caption files)"
                                                                             if p["created"] else "") + ".")
    parts = [render.message(head, "ok" if p["changed"] else "info")]
    if p["examples"]:
        rows = "".join(f"<tr><td><code>{_e(x['file'])}</code></td><td>{_e(x['before'] if x['before'] is not None else '(no caption file)')}"
                       f"</td><td>{_e(x['after'])}</td></tr>" for x in p["examples"])
        parts.append("<table class='sd-trainer-caption-preview'><tr><th>File</th><th>Before</th><th>After</th></tr>"
                     f"{rows}</table>")
    parts += [render.message(n) for n in p["notes"]]
    return "".join(parts)


class _CaptionHandlers:
    """The panel's event functions (plain Python: values in, values/HTML out)."""

    def __init__(self, roots: Callable[[], Sequence[str] | None]):
        self.roots = roots

    def _load(self, train_dir: str, reg_dir: str, extension: str, legacy: bool) -> ce.Captions:
        dataset, _ = ce.split_request({"train_dir": train_dir or "", "reg_dir": reg_dir or "",
                                       "caption_extension": extension or ".txt", "legacy_encoding": bool(legacy)},
                                      with_plan=False)
        roots = self.roots()
        ce.check_confined(dataset, roots)
        with confined_to(roots):
            return ce.load_captions(dataset["train_dir"], dataset["reg_dir"] or None,
                                    caption_extension=dataset["caption_extension"], legacy_encoding=bool(legacy))

    def _loaded(self, captions: ce.Captions, html_text: str) -> tuple[Any, Any, str]:
        return (gr.update(value=table_value(captions)),
                gr.update(choices=[ALL_FOLDERS, *captions.folders]), html_text)

    @staticmethod
    def _plan(values: Sequence[Any]) -> ce.CaptionPlan:
        v = dict(zip(PLAN_KEYS, values, strict=True))
        v["folder"] = ce.ALL if v["folder"] in (None, "", ALL_FOLDERS) else v["folder"]
        for key in ("trigger", "remove", "find", "replace_with", "add"):
            v[key] = v[key] or ""
        for key in ("dedupe", "sort", "include_uncaptioned"):
            v[key] = bool(v[key])
        keep = v["keep_first"]
        v["keep_first"] = int(keep) if isinstance(keep, (int, float)) and float(keep).is_integer() else keep
        return ce.plan_from_dict(v)

    def load(self, train_dir: str, reg_dir: str, extension: str, legacy: bool) -> tuple[Any, Any, str]:
        """→ (the tag table, the folder choices, the summary)."""
        try:
            captions = self._load(train_dir, reg_dir, extension, legacy)
        except TrainerError as e:
            return gr.update(), gr.update(), render.error(e)
        return self._loaded(captions, render_summary(captions))

    def preview(self, train_dir: str, reg_dir: str, extension: str, legacy: bool, *values: Any) -> str:
        try:
            plan = self._plan(values)
            return render_preview(ce.preview(self._load(train_dir, reg_dir, extension, legacy), plan))
        except TrainerError as e:
            return render.error(e)

    def apply(self, train_dir: str, reg_dir: str, extension: str, legacy: bool, *values: Any) -> tuple[Any, Any, str]:
        """→ (the tag table, the folder choices, what was written) — the tables as they are now."""
        try:
            plan = self._plan(values)
            result = ce.apply_plan(self._load(train_dir, reg_dir, extension, legacy), plan)
            captions = self._load(train_dir, reg_dir, extension, legacy)
        except TrainerError as e:
            return gr.update(), gr.update(), render.error(e)
        if not result["changed"]:
            return self._loaded(captions, render.message("No caption changes; nothing was written."))
        text = (f"Wrote {result['changed']} caption(s)" + (f" ({result['created']} new)" if result["created"] else "")
                + f". The previous captions are kept in {result['backup']}; Undo restores them.")
        return self._loaded(captions, render.message(text, "ok") + render_summary(captions))

    def undo(self, train_dir: str, reg_dir: str, extension: str, legacy: bool) -> tuple[Any, Any, str]:
        try:
            dataset, _ = ce.split_request({"train_dir": train_dir or ""}, with_plan=False)
            roots = self.roots()
            ce.check_confined(dataset, roots)
            result = ce.undo_last(dataset["train_dir"], roots)
            captions = self._load(train_dir, reg_dir, extension, legacy)
        except TrainerError as e:
            return gr.update(), gr.update(), render.error(e)
        text = (f"Restored {result['restored']} caption(s)" + (f" and deleted {result['deleted']} created by the "
                                                              "apply" if result["deleted"] else "")
                + f" from {result['backup']}" + (f"; {result['remaining']} earlier apply(s) can still be undone"
                                                 if result["remaining"] else "") + ".")
        return self._loaded(captions, render.message(text, "ok") + render_summary(captions))

    @staticmethod
    def pick(remove: str, table: Any, evt: gr.SelectData) -> str:
        """A click on a row of the tag table adds its tag to the "remove" field (a second click takes it out)."""
        try:
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
            rows = table.values.tolist() if hasattr(table, "values") else table
            tag = str(rows[row][0])
        except (TypeError, ValueError, IndexError):
            return remove
        tags = ce.parse_tag_list(remove or "")
        keys = [ce.tag_key(t) for t in tags]
        if not tag:
            return remove
        if ce.tag_key(tag) in keys:
            tags.pop(keys.index(ce.tag_key(tag)))
        else:
            tags.append(tag)
        return ", ".join(tags)


@dataclass
class CaptionsPanel:
    """What the tab wires after building the panel: ``changed`` are the Apply and Undo events (chain the scan
    refresh on them with ``.then``)."""

    changed: list[Any]
    components: dict[str, Any]


def build_captions_panel(train_dir: Any, reg_dir: Any, caption_extension: Any, *,
                         roots: Callable[[], Sequence[str] | None] = lambda: None) -> CaptionsPanel:
    """Build the panel inside the caller's current gradio context, reading the tab's dataset fields
    ``train_dir``, ``reg_dir`` and ``caption_extension``; ``roots()`` gives the folders a shared WebUI allows
    (None: any)."""
    h = _CaptionHandlers(roots)
    d = ce.CaptionPlan()
    c: dict[str, Any] = {}
    with gr.Accordion("Captions (edit in bulk)", open=False, elem_id=ELEM + "panel"):
        gr.HTML(render.message("Load shows every tag of the dataset with the number of images that have it, per "
                               "folder. Click a tag to add it to 'Remove tags'. Preview shows what the actions "
                               "would change; Apply writes it (the previous captions are kept for Undo)."))
        with gr.Row():
            c["load"] = gr.Button("Load captions", elem_id=ELEM + "load", scale=0)
            c["legacy"] = gr.Checkbox(False, label="Read captions that are not UTF-8 as Windows-1252",
                                      info="changed captions are always written as UTF-8", elem_id=ELEM + "legacy")
        c["table"] = gr.Dataframe(value=table_value(None), headers=TABLE_HEADERS, type="array", interactive=False,
                                  wrap=True, label="Tags (images per folder)", elem_id=ELEM + "table")
        with gr.Row(variant="compact"):
            c["folder"] = gr.Dropdown([ALL_FOLDERS], value=ALL_FOLDERS, label="Apply to",
                                      elem_id=ELEM + "folder")
            c["trigger"] = gr.Textbox(label="Trigger word(s) first", value=d.trigger, placeholder="mychar",
                                      info="moved to the front; added where missing", elem_id=ELEM + "trigger")
            c["remove"] = gr.Textbox(label="Remove tags", value=d.remove, placeholder="blurry, watermark",
                                     info="comma-separated", elem_id=ELEM + "remove")
        with gr.Row(variant="compact"):
            c["find"] = gr.Textbox(label="Replace", value=d.find, elem_id=ELEM + "find")
            c["replace_with"] = gr.Textbox(label="With", value=d.replace_with, elem_id=ELEM + "replace_with")
            c["mode"] = gr.Radio(list(ce.MODES), value=d.mode, label="Replace what", info=MODE_INFO,
                                 elem_id=ELEM + "mode")
        with gr.Row(variant="compact"):
            c["add"] = gr.Textbox(label="Add tag(s) where missing", value=d.add, elem_id=ELEM + "add")
            c["dedupe"] = gr.Checkbox(d.dedupe, label="Remove repeated tags", elem_id=ELEM + "dedupe")
            c["sort"] = gr.Checkbox(d.sort, label="Sort tags by frequency", elem_id=ELEM + "sort")
            c["keep_first"] = gr.Number(d.keep_first, precision=0, minimum=0, maximum=ce.MAX_KEEP_FIRST,
                                        label="Keep the first N in place (sort)", elem_id=ELEM + "keep_first")
            c["include_uncaptioned"] = gr.Checkbox(d.include_uncaptioned, label="Also images without a caption",
                                                   info="they get a caption file when an action gives them a tag",
                                                   elem_id=ELEM + "include_uncaptioned")
        with gr.Row():
            c["preview"] = gr.Button("Preview", elem_id=ELEM + "preview")
            c["apply"] = gr.Button("Apply", variant="primary", elem_id=ELEM + "apply")
            c["undo"] = gr.Button("Undo last apply", elem_id=ELEM + "undo")
        c["status"] = gr.HTML(elem_id=ELEM + "status")

    dataset = [train_dir, reg_dir, caption_extension, c["legacy"]]
    plan = [c[k] for k in PLAN_KEYS]
    loaded = [c["table"], c["folder"], c["status"]]
    c["load"].click(fn=h.load, inputs=dataset, outputs=loaded)
    c["preview"].click(fn=h.preview, inputs=dataset + plan, outputs=[c["status"]])
    applied = c["apply"].click(fn=h.apply, inputs=dataset + plan, outputs=loaded)
    undone = c["undo"].click(fn=h.undo, inputs=dataset, outputs=loaded)
    c["table"].select(fn=h.pick, inputs=[c["remove"], c["table"]], outputs=[c["remove"]])
    return CaptionsPanel(changed=[applied, undone], components=c)
