"""Epoch × weight grid planning (lib_train.grid), without the WebUI: finding runs on disk, weight/seed specs, the
prompt rewrite of each cell, the cell layout and labels, and keeping a choice (sidecar write-back, promotion).

Model files are real safetensors files (written here byte by byte, read back with the safetensors library)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from lib_train.errors import TrainerError
from lib_train.grid import axes
from lib_train.grid.axes import ThirdValue, fix_seeds, format_weight, parse_seeds, parse_third_axis, parse_weights
from lib_train.grid.keep import keep_choice, promote_to_final, write_preferred_weight
from lib_train.grid.plan import Cell, choice_from_infotext, plan_grid
from lib_train.grid.prompts import cell_prompt, set_embedding_token, set_last_lora_weight, set_lora_tag
from lib_train.grid.runs import discover_runs, find_run, select_files
from lib_train.safetensors_io import read_metadata, read_safetensors_header


# ---------------------------------------------------------------- helpers

def write_safetensors(path: Path, meta: dict[str, str] | None = None, *, seed: int = 0, n: int = 6) -> np.ndarray:
    """A safetensors file with one float32 tensor ``w`` of ``n`` values drawn from ``seed``; returns the values."""
    values = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    header: dict = {"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + values.tobytes())
    return values


def lora_run(folder: Path, name: str = "mychar", epochs: int = 3, *, sidecar: dict | None = None,
             config: bool = True) -> dict[str, np.ndarray]:
    """Epoch saves ``NAME-000001`` … and the final ``NAME`` (= the last epoch), with the trainer's metadata."""
    values = {}
    for e in range(1, epochs):
        stem = f"{name}-{e:06d}"
        values[stem] = write_safetensors(folder / f"{stem}.safetensors",
                                         {"ss_output_name": stem, "ss_epoch": str(e), "ss_steps": str(4 * e)}, seed=e)
    values[name] = write_safetensors(folder / f"{name}.safetensors",
                                     {"ss_output_name": name, "ss_epoch": str(epochs), "ss_steps": str(4 * epochs),
                                      "ss_training_comment": "kept"}, seed=epochs)
    if config:
        (folder / f"{name}.config.json").write_text("{}", encoding="utf-8")
    if sidecar is not None:
        (folder / f"{name}.json").write_text(json.dumps(sidecar), encoding="utf-8")
    return values


def draws(*values: int):
    """A ``draw`` callable returning ``values`` in turn, counting its calls."""
    it = iter(values)

    def draw() -> int:
        draw.calls += 1
        return next(it)

    draw.calls = 0
    return draw


def data_of(path: Path) -> np.ndarray:
    return load_file(str(path))["w"]


@pytest.fixture
def lora_root(tmp_path) -> Path:
    root = tmp_path / "Lora"
    lora_run(root / "mychar", sidecar={"sd version": "SD1", "activation text": "thing", "notes": "mine"})
    return root


# ---------------------------------------------------------------- discovering runs

def test_a_lora_run_is_its_epoch_saves_then_the_final_file(lora_root):
    runs = discover_runs(lora_root, "lora")
    assert [r.label for r in runs] == ["LoRA: mychar/mychar"]
    run = runs[0]
    assert run.kind == "lora" and run.name == "mychar" and run.folder == lora_root / "mychar"
    assert [f.stem for f in run.files] == ["mychar-000001", "mychar-000002", "mychar"]
    assert [f.label for f in run.files] == ["epoch 1", "epoch 2", "epoch 3 (final)"]
    assert [f.role for f in run.files] == ["epoch", "epoch", "final"]
    assert run.config == lora_root / "mychar" / "mychar.config.json"
    assert run.stems == ("mychar-000001", "mychar-000002", "mychar")
    assert run.final_path == lora_root / "mychar" / "mychar.safetensors"


def test_step_saves_are_ordered_by_step_with_the_epochs(tmp_path):
    folder = tmp_path / "r"
    write_safetensors(folder / "r-000002.safetensors", {"ss_epoch": "2", "ss_steps": "40"})
    write_safetensors(folder / "r-step00000030.safetensors", {"ss_epoch": "2", "ss_steps": "30"})
    write_safetensors(folder / "r-000001.safetensors", {"ss_epoch": "1", "ss_steps": "20"})
    write_safetensors(folder / "r-step00000010.safetensors", {"ss_epoch": "1", "ss_steps": "10"})
    write_safetensors(folder / "r.safetensors", {"ss_epoch": "3", "ss_steps": "60"})
    run = discover_runs(tmp_path, "lora")[0]
    assert [f.stem for f in run.files] == ["r-step00000010", "r-000001", "r-step00000030", "r-000002", "r"]
    assert [f.label for f in run.files] == ["step 10", "epoch 1", "step 30", "epoch 2", "epoch 3 (final)"]


def test_without_metadata_epochs_come_before_steps_and_the_final_says_final(tmp_path):
    for stem in ["k-step00000005", "k-000010", "k-000002", "k"]:
        write_safetensors(tmp_path / f"{stem}.safetensors")  # no __metadata__ at all
    run = discover_runs(tmp_path, "lora")[0]
    assert run.label == "LoRA: k"  # a run at the root has no folder in its label
    assert [f.stem for f in run.files] == ["k-000002", "k-000010", "k-step00000005", "k"]
    assert [f.label for f in run.files] == ["epoch 2", "epoch 10", "step 5", "final"]


def test_lone_model_files_are_not_runs_but_a_config_makes_one(tmp_path):
    write_safetensors(tmp_path / "other.safetensors")
    write_safetensors(tmp_path / "style-2.safetensors")  # "-2" is not an epoch save (6 digits are)
    write_safetensors(tmp_path / "solo.safetensors")
    (tmp_path / "solo.config.json").write_text("{}")
    write_safetensors(tmp_path / "a-b-000001.safetensors")  # a name with a dash: run "a-b" without a final yet
    runs = discover_runs(tmp_path, "lora")
    assert [(r.name, [f.stem for f in r.files]) for r in runs] == [("a-b", ["a-b-000001"]), ("solo", ["solo"])]


def test_hidden_and_resume_state_folders_are_skipped_and_runs_are_sorted(tmp_path):
    lora_run(tmp_path / "zeta", "zeta", 2)
    lora_run(tmp_path / "sub" / "alpha", "alpha", 2)
    lora_run(tmp_path / ".latent-cache", "hidden", 2)
    state = tmp_path / "zeta" / "zeta-state"
    write_safetensors(state / "network.safetensors")
    write_safetensors(state / "network-000001.safetensors")
    (state / "state.json").write_text("{}")
    (tmp_path / "zeta" / "notes-000001.txt").write_text("not a model")
    assert [r.label for r in discover_runs(tmp_path, "lora")] == ["LoRA: sub/alpha/alpha", "LoRA: zeta/zeta"]


def test_two_runs_in_one_folder_stay_apart(tmp_path):
    lora_run(tmp_path, "one", 2)
    lora_run(tmp_path, "two", 3)
    runs = {r.name: r for r in discover_runs(tmp_path, "lora")}
    assert [f.stem for f in runs["one"].files] == ["one-000001", "one"]
    assert [f.stem for f in runs["two"].files] == ["two-000001", "two-000002", "two"]


def test_embedding_runs_are_named_by_step_and_prefer_safetensors(tmp_path):
    folder = tmp_path / "laohuang"
    for stem in ["laohuang-000500", "laohuang-001000", "laohuang"]:
        write_safetensors(folder / f"{stem}.safetensors", {"modelspec.title": stem})
        (folder / f"{stem}.pt").write_bytes(b"pt " + stem.encode())
    (folder / "laohuang-000250.pt").write_bytes(b"only a pt")
    run = discover_runs(tmp_path, "embedding")[0]
    assert run.label == "Embedding: laohuang/laohuang"
    assert [f.stem for f in run.files] == ["laohuang-000250", "laohuang-000500", "laohuang-001000", "laohuang"]
    assert [f.label for f in run.files] == ["step 250", "step 500", "step 1000", "final"]
    assert [f.path.suffix for f in run.files] == [".pt", ".safetensors", ".safetensors", ".safetensors"]
    assert run.files[1].siblings == (folder / "laohuang-000500.pt",)
    as_lora = discover_runs(tmp_path, "lora")[0]  # LoRA runs are .safetensors only
    assert [f.path.name for f in as_lora.files] == ["laohuang-000500.safetensors", "laohuang-001000.safetensors",
                                                    "laohuang.safetensors"]


def test_a_missing_folder_has_no_runs(tmp_path):
    assert discover_runs(tmp_path / "nope", "lora") == []
    with pytest.raises(ValueError):
        discover_runs(tmp_path, "hypernetwork")


def test_find_run_by_label_name_file_or_folder(tmp_path):
    lora_run(tmp_path / "a" / "mychar", "mychar", 2)
    lora_run(tmp_path / "b" / "mychar", "mychar", 2)
    lora_run(tmp_path / "solo", "solo", 3)
    runs = discover_runs(tmp_path, "lora")
    assert find_run(runs, "LoRA: a/mychar/mychar").folder == tmp_path / "a" / "mychar"
    assert find_run(runs, "solo").name == "solo"
    assert find_run(runs, "solo-000002").name == "solo"
    assert find_run(runs, str(tmp_path / "b" / "mychar" / "mychar-000001.safetensors")).folder.parent.name == "b"
    assert find_run(runs, str(tmp_path / "b" / "mychar") + "/").folder.parent.name == "b"
    with pytest.raises(TrainerError, match=r"run: 'mychar' matches 2 runs; give one of: LoRA: a/mychar/mychar, "
                                           r"LoRA: b/mychar/mychar"):
        find_run(runs, "mychar")
    with pytest.raises(TrainerError, match=r"run: no training run 'ghost'\. Runs found: LoRA: a/mychar/mychar"):
        find_run(runs, "ghost")
    with pytest.raises(TrainerError, match=r"^run: choose a training run"):
        find_run(runs, "  ")
    with pytest.raises(TrainerError, match=r"No runs were found.*save_every_epochs"):
        find_run([], "x")


def test_select_files_keeps_training_order(lora_root):
    run = discover_runs(lora_root, "lora")[0]
    assert [f.stem for f in select_files(run, None)] == ["mychar-000001", "mychar-000002", "mychar"]
    assert [f.stem for f in select_files(run, ["mychar", "mychar-000001"])] == ["mychar-000001", "mychar"]
    assert [f.stem for f in select_files(run, "epoch 2, epoch 3 (final)")] == ["mychar-000002", "mychar"]
    with pytest.raises(TrainerError, match=r"^files: 'mychar-000009' is not a file of the run LoRA: mychar/mychar; "
                                           r"its files are: mychar-000001 \(epoch 1\)"):
        select_files(run, ["mychar-000009"])


# ---------------------------------------------------------------- weights, seeds, third axis

@pytest.mark.parametrize("spec, expected", [
    ("0.2-1.0 (+0.2)", [0.2, 0.4, 0.6, 0.8, 1.0]),
    ("0.2-1.0 [5]", [0.2, 0.4, 0.6, 0.8, 1.0]),
    ("1.0-0.2 (-0.2)", [1.0, 0.8, 0.6, 0.4, 0.2]),
    ("0.1-0.3 (+0.1)", [0.1, 0.2, 0.3]),
    ("0.4, 0.7, 1", [0.4, 0.7, 1.0]),
    ("0, 0.5-1 (+0.25)", [0.0, 0.5, 0.75, 1.0]),
    ("1, 1.0, 0.5, 1", [1.0, 0.5]),
    ("-1-1 (+0.5)", [-1.0, -0.5, 0.0, 0.5, 1.0]),
    ("-0.5", [-0.5]),
    ("0.3-0.9 (+0.25)", [0.3, 0.55, 0.8]),
    ("2-2 [1]", [2.0]),
    (" .5 ;\n1.5 ", [0.5, 1.5]),
])
def test_weight_specs(spec, expected):
    assert parse_weights(spec) == pytest.approx(expected)


@pytest.mark.parametrize("spec, message", [
    ("", r"give at least one weight"),
    (" , ", r"give at least one weight"),
    ("abc", r"'abc' is not a number"),
    ("0.2-1.0", r"'0.2-1.0' is a range without a step; write e.g. '0.2-1.0 \(\+0.2\)'"),
    ("0-1 (+0)", r"step of 0"),
    ("0-1 (-0.2)", r"steps away from its end; use \(\+0.2\)"),
    ("1-0 (+0.2)", r"steps away from its end; use \(-0.2\)"),
    ("0-100 (+0.01)", r"gives 10001 values; at most 64"),
    ("0-1 [0]", r"asks for 0 values"),
    ("nan", r"not a finite number"),
    ("inf", r"not a finite number"),
])
def test_bad_weight_specs_name_the_field(spec, message):
    with pytest.raises(TrainerError, match=r"^weights: .*" + message):
        parse_weights(spec)


def test_format_weight():
    assert [format_weight(w) for w in (1.0, 0.6000000001, 0.25, -0.0, 1e-7, -1.5, 2)] == \
        ["1", "0.6", "0.25", "0", "0", "-1.5", "2"]


def test_seed_specs_and_random_seeds_drawn_once():
    assert parse_seeds("1, 2,3") == [1, 2, 3]
    assert parse_seeds("100-103, 7") == [100, 101, 102, 103, 7]
    assert parse_seeds("-1, 5") == [-1, 5]
    draw = draws(11, 22)
    assert fix_seeds([-1, 5, -1], draw) == [11, 5, 22] and draw.calls == 2
    for spec, message in [("x", "'x' is not a whole number"), ("-2", "-2 is out of range"),
                          ("4294967296", "out of range"), ("5-3", "must go upwards"), ("", "at least one seed")]:
        with pytest.raises(TrainerError, match=r"^seeds: .*" + message):
            parse_seeds(spec)


def test_third_axis_values():
    assert parse_third_axis("Nothing", "ignored", draws()) == [ThirdValue()]
    assert parse_third_axis("Nothing", "", draws())[0].label == ""
    prompts = parse_third_axis("Prompts", "a cat\n\n  a dog  \n", draws())
    assert [t.prompt for t in prompts] == ["a cat", "a dog"] and [t.label for t in prompts] == ["a cat", "a dog"]
    long = parse_third_axis("Prompts", "word " * 40, draws())[0]
    assert len(long.label) == axes.LABEL_CHARS and long.label.endswith("…")
    draw = draws(99)
    seeds = parse_third_axis("Seeds", "3, -1", draw)
    assert [t.seed for t in seeds] == [3, 99] and [t.label for t in seeds] == ["seed 3", "seed 99"]
    with pytest.raises(TrainerError, match=r"^third axis: give one prompt per line"):
        parse_third_axis("Prompts", "\n \n", draws())
    with pytest.raises(TrainerError, match=r"^third axis: 'x' is not a whole number"):
        parse_third_axis("Seeds", "x", draws())
    with pytest.raises(TrainerError, match=r"^third axis: 'Colors' is not one of Nothing, Prompts, Seeds"):
        parse_third_axis("Colors", "", draws())


# ---------------------------------------------------------------- prompts

STEMS = ("mychar-000001", "mychar-000002", "mychar")


@pytest.mark.parametrize("prompt, stem, weight, expected", [
    ("a photo of thing", "mychar-000002", 0.6, "a photo of thing <lora:mychar-000002:0.6>"),
    ("", "mychar", 1.0, "<lora:mychar:1>"),
    ("thing <lora:mychar:0.8>, red", "mychar-000001", 0.4, "thing <lora:mychar-000001:0.4>, red"),
    ("thing <lora:mychar:0.8>, red", "mychar-000001", None, "thing <lora:mychar-000001:0.8>, red"),
    ("<lyco:mychar-000002:1> thing", "mychar", 0.5, "<lora:mychar:0.5> thing"),
    ("<lora:mychar:te=0.5> thing", "mychar-000001", None, "<lora:mychar-000001:1> thing"),
    ("<lora:other:0.3> thing", "mychar", 0.7, "<lora:other:0.3> thing <lora:mychar:0.7>"),
    ("<lora:mychar:1> thing <lora:mychar-000001:0.5> more", "mychar-000002", 0.9,
     "<lora:mychar-000002:0.9> thing more"),
    ("<lora:mycharacter:1> thing", "mychar", 0.5, "<lora:mycharacter:1> thing <lora:mychar:0.5>"),
])
def test_lora_tag_of_a_cell(prompt, stem, weight, expected):
    assert set_lora_tag(prompt, stem, weight, STEMS) == expected


def test_weight_of_the_last_lora_tag():
    assert set_last_lora_weight("<lora:a:1> x <lora:b:0.2>, y", 0.75) == "<lora:a:1> x <lora:b:0.75>, y"
    with pytest.raises(TrainerError, match=r"^Trainer: LoRA weight: the prompt has no <lora:NAME:w> tag"):
        set_last_lora_weight("just words", 0.5)


EMB = ("laohuang-000500", "laohuang")


@pytest.mark.parametrize("prompt, stem, weight, expected", [
    ("a photo of laohuang, smiling", "laohuang-000500", 0.6, "a photo of (laohuang-000500:0.6), smiling"),
    ("a photo of laohuang", "laohuang-000500", 1.0, "a photo of laohuang-000500"),
    ("(laohuang:0.8) portrait", "laohuang-000500", None, "(laohuang-000500:0.8) portrait"),
    ("(laohuang-000500 : 1.2) and laohuang", "laohuang", 0.5, "(laohuang:0.5) and (laohuang:0.5)"),
    ("laohuang_v2 portrait", "laohuang", 0.7, "(laohuang:0.7), laohuang_v2 portrait"),
    ("", "laohuang", 0.7, "(laohuang:0.7)"),
])
def test_embedding_token_of_a_cell(prompt, stem, weight, expected):
    assert set_embedding_token(prompt, stem, weight, EMB) == expected


# ---------------------------------------------------------------- the grid plan

def test_a_3_by_3_plan(lora_root):
    run = discover_runs(lora_root, "lora")[0]
    draw = draws(1234)
    plan = plan_grid(run, files=None, weights="0.5-1.5 (+0.5)", prompt="thing", seed=-1, draw=draw)
    assert draw.calls == 1 and plan.seed == 1234  # -1 is drawn once, for every cell
    assert (plan.cols, plan.rows, len(plan.cells)) == (3, 3, 9)
    assert {c.seed for c in plan.cells} == {1234}
    # generated file by file (the Lora extension keeps a file loaded while only the weight changes) …
    assert [(c.file.stem, c.weight) for c in plan.cells[:4]] == [
        ("mychar-000001", 0.5), ("mychar-000001", 1.0), ("mychar-000001", 1.5), ("mychar-000002", 0.5)]
    # … and placed files across, weights down
    assert sorted((plan.index(c), c.col, c.row) for c in plan.cells)[:4] == [(0, 0, 0), (1, 1, 0), (2, 2, 0),
                                                                            (3, 0, 1)]
    cell = next(c for c in plan.cells if c.col == 1 and c.row == 2)
    assert cell.prompt == "thing <lora:mychar-000002:1.5>"
    assert cell.infotext_params == {"Trainer file": "mychar-000002", "Trainer weight": "1.5"}
    assert plan.col_labels() == [["epoch 1"], ["epoch 2"], ["epoch 3 (final)"]]
    assert plan.row_labels() == [["weight 0.5"], ["weight 1"], ["weight 1.5"]]


def test_plan_with_chosen_files_and_a_fixed_seed(lora_root):
    run = discover_runs(lora_root, "lora")[0]
    draw = draws()
    plan = plan_grid(run, files=["mychar", "mychar-000002"], weights="0.7", prompt="<lora:mychar:1> thing",
                     seed=42, draw=draw)
    assert draw.calls == 0 and plan.seed == 42
    assert [c.prompt for c in plan.cells] == ["<lora:mychar-000002:0.7> thing", "<lora:mychar:0.7> thing"]


def test_plan_with_a_seed_axis(lora_root):
    run = discover_runs(lora_root, "lora")[0]
    plan = plan_grid(run, files=["mychar"], weights="0.5, 1", prompt="thing", seed=7, third_kind="Seeds",
                     third_values="-1, 3", draw=draws(555))
    assert (plan.cols, plan.rows) == (1, 4)
    assert [(c.row, c.seed, c.weight) for c in sorted(plan.cells, key=lambda c: c.row)] == [
        (0, 555, 0.5), (1, 555, 1.0), (2, 3, 0.5), (3, 3, 1.0)]
    assert plan.row_labels() == [["seed 555", "weight 0.5"], ["seed 555", "weight 1"], ["seed 3", "weight 0.5"],
                                 ["seed 3", "weight 1"]]


def test_plan_with_a_prompt_axis_replaces_the_prompt(lora_root):
    run = discover_runs(lora_root, "lora")[0]
    plan = plan_grid(run, files=["mychar-000001"], weights="1", prompt="ignored", seed=1, third_kind="Prompts",
                     third_values="a cat\nthing <lora:mychar:0.3> in snow", draw=draws())
    assert [c.prompt for c in plan.cells] == ["a cat <lora:mychar-000001:1>", "thing <lora:mychar-000001:1> in snow"]
    assert {c.seed for c in plan.cells} == {1}


def test_plan_for_an_embedding_run(tmp_path):
    for stem in ["laohuang-000500", "laohuang"]:
        write_safetensors(tmp_path / f"{stem}.safetensors")
    run = discover_runs(tmp_path, "embedding")[0]
    plan = plan_grid(run, files=None, weights="0.5, 1", prompt="photo of laohuang", seed=3, draw=draws())
    assert [c.prompt for c in plan.cells] == ["photo of (laohuang-000500:0.5)", "photo of laohuang-000500",
                                              "photo of (laohuang:0.5)", "photo of laohuang"]


def test_a_plan_too_large_is_refused(lora_root):
    run = discover_runs(lora_root, "lora")[0]
    with pytest.raises(TrainerError, match=r"^weights: 3 files × 64 weights × 3 = 576 images; at most 400"):
        plan_grid(run, files=None, weights="0.01-0.64 [64]", prompt="", seed=1, third_kind="Seeds",
                  third_values="1, 2, 3", draw=draws())


def test_cell_choice_round_trips_through_an_infotext(lora_root):
    run = discover_runs(lora_root, "lora")[0]
    cell = plan_grid(run, files=["mychar-000002"], weights="0.65", prompt="x", seed=1, draw=draws()).cells[0]
    params = ", ".join(f"{k}: {v}" for k, v in cell.infotext_params.items())
    text = f"x <lora:mychar-000002:0.65>\nSteps: 2, Seed: 1, {params}, Trainer run: \"LoRA: mychar/mychar\""
    assert choice_from_infotext(text) == ("mychar-000002", 0.65)
    assert choice_from_infotext('p\nSteps: 2, Trainer file: "odd, name", Trainer weight: 1') == ("odd, name", 1.0)
    grid_text = "x\nSteps: 2, Script: Epoch × weight grid, Trainer run: r, Trainer weights: 0.2-1.0 (+0.2)"
    assert choice_from_infotext(grid_text) is None
    assert choice_from_infotext("") is None
    assert isinstance(cell, Cell)


def test_cell_prompt_dispatches_on_the_run_kind(lora_root, tmp_path):
    lora = discover_runs(lora_root, "lora")[0]
    write_safetensors(tmp_path / "e" / "emb-000100.safetensors")
    write_safetensors(tmp_path / "e" / "emb.safetensors")
    emb = discover_runs(tmp_path / "e", "embedding")[0]
    assert cell_prompt(lora, "emb", "mychar", 0.5) == "emb <lora:mychar:0.5>"
    assert cell_prompt(emb, "emb", "emb-000100", 0.5) == "(emb-000100:0.5)"


# ---------------------------------------------------------------- keeping a choice

def test_preferred_weight_keeps_every_other_sidecar_key(lora_root):
    model = lora_root / "mychar" / "mychar.safetensors"
    path = write_preferred_weight(model, 0.7)
    assert path == lora_root / "mychar" / "mychar.json"
    assert json.loads(path.read_text()) == {"sd version": "SD1", "activation text": "thing", "notes": "mine",
                                            "preferred weight": 0.7}
    write_preferred_weight(model, 0.55)
    assert json.loads(path.read_text())["preferred weight"] == 0.55


def test_preferred_weight_without_a_sidecar_takes_the_version_from_the_metadata(tmp_path):
    write_safetensors(tmp_path / "v2.safetensors", {"ss_v2": "True"})
    write_safetensors(tmp_path / "xl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    write_safetensors(tmp_path / "bare.safetensors")
    (tmp_path / "odd.json").write_text("[1, 2]")
    write_safetensors(tmp_path / "odd.safetensors", {"ss_epoch": "1"})
    assert json.loads(write_preferred_weight(tmp_path / "v2.safetensors", 1.25).read_text()) == \
        {"sd version": "SD2", "preferred weight": 1.25}
    assert json.loads(write_preferred_weight(tmp_path / "xl.safetensors", 0.5).read_text())["sd version"] == "SDXL"
    assert json.loads(write_preferred_weight(tmp_path / "bare.safetensors", 0.5).read_text())["sd version"] == \
        "Unknown"
    assert json.loads(write_preferred_weight(tmp_path / "odd.safetensors", 0.5).read_text())["sd version"] == "SD1"
    with pytest.raises(TrainerError, match=r"^weight: 0 cannot be a preferred weight"):
        write_preferred_weight(tmp_path / "v2.safetensors", 0)
    with pytest.raises(TrainerError, match=r"^weight: nan is not a finite number"):
        write_preferred_weight(tmp_path / "v2.safetensors", float("nan"))


def test_promoting_an_epoch_keeps_the_old_final_as_its_epoch(lora_root):
    folder = lora_root / "mychar"
    before = {p.name: data_of(p) for p in folder.glob("*.safetensors")}
    run = discover_runs(lora_root, "lora")[0]
    result = promote_to_final(run, "mychar-000002")
    assert result.final == folder / "mychar.safetensors"
    assert result.kept_aside == folder / "mychar-000003.safetensors"
    np.testing.assert_array_equal(data_of(folder / "mychar.safetensors"), before["mychar-000002.safetensors"])
    np.testing.assert_array_equal(data_of(folder / "mychar-000003.safetensors"), before["mychar.safetensors"])
    final_meta, aside_meta = read_metadata(folder / "mychar.safetensors"), read_metadata(result.kept_aside)
    assert final_meta == {"ss_output_name": "mychar", "ss_epoch": "2", "ss_steps": "8"}  # the alias is the run's
    assert aside_meta == {"ss_output_name": "mychar-000003", "ss_epoch": "3", "ss_steps": "12",
                          "ss_training_comment": "kept"}
    assert read_safetensors_header(folder / "mychar.safetensors")[1] % 8 == 0
    assert result.messages == ["The previous mychar.safetensors was kept as mychar-000003.safetensors.",
                               "mychar-000002.safetensors (epoch 2) is now mychar.safetensors."]
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]

    # the run now lists the kept epoch; promoting again replaces a final that exists elsewhere, adding no file
    run = discover_runs(lora_root, "lora")[0]
    assert [f.label for f in run.files] == ["epoch 1", "epoch 2", "epoch 3", "epoch 2 (final)"]
    files_before = sorted(p.name for p in folder.iterdir())
    result = promote_to_final(run, "mychar-000003")
    assert result.kept_aside is None and "equals mychar-000002.safetensors" in result.messages[0]
    assert sorted(p.name for p in folder.iterdir()) == files_before
    np.testing.assert_array_equal(data_of(folder / "mychar.safetensors"), before["mychar.safetensors"])
    assert read_metadata(folder / "mychar.safetensors")["ss_output_name"] == "mychar"


def test_a_final_without_a_free_epoch_name_is_kept_as_previous(tmp_path):
    folder = tmp_path / "r"
    write_safetensors(folder / "r-000001.safetensors", {"ss_output_name": "r-000001"}, seed=1)
    old = write_safetensors(folder / "r.safetensors", {"ss_output_name": "r"}, seed=2)  # no ss_epoch
    run = discover_runs(tmp_path, "lora")[0]
    assert promote_to_final(run, "r-000001").kept_aside == folder / "r-previous.safetensors"
    np.testing.assert_array_equal(data_of(folder / "r-previous.safetensors"), old)
    write_safetensors(folder / "r.safetensors", {"ss_output_name": "r"}, seed=3)  # a new final, e.g. a re-run
    run = discover_runs(tmp_path, "lora")[0]
    assert [f.label for f in run.files] == ["epoch 1", "previous final", "final"]
    assert promote_to_final(run, "r-000001").kept_aside == folder / "r-previous-2.safetensors"
    run = discover_runs(tmp_path, "lora")[0]
    assert [f.label for f in run.files] == ["epoch 1", "previous final", "previous final 2", "final"]


def test_a_final_copy_is_recognised_by_its_sshs_hash(tmp_path):
    import hashlib

    def save(stem: str, seed: int, epoch: int) -> None:
        values = np.random.default_rng(seed).standard_normal(6).astype(np.float32)
        meta = {"ss_output_name": stem, "ss_epoch": str(epoch),
                "sshs_model_hash": hashlib.sha256(values.tobytes()).hexdigest()}
        write_safetensors(tmp_path / f"{stem}.safetensors", meta, seed=seed)

    save("r-000001", 1, 1)
    save("r-000002", 2, 2)
    save("r", 2, 2)  # the final equals epoch 2 (its hash says so)
    run = discover_runs(tmp_path, "lora")[0]
    result = promote_to_final(run, "r-000001")
    assert result.kept_aside is None and result.messages[0] == ("The previous r.safetensors equals "
                                                                "r-000002.safetensors; it was replaced.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-000001.safetensors", "r-000002.safetensors",
                                                          "r.safetensors"]


def test_promoting_without_a_final_and_promoting_the_final(tmp_path):
    write_safetensors(tmp_path / "r-000001.safetensors", {"ss_output_name": "r-000001"}, seed=1)
    run = discover_runs(tmp_path, "lora")[0]
    result = promote_to_final(run, "r-000001")
    assert result.kept_aside is None and result.messages == ["r-000001.safetensors (epoch 1) is now r.safetensors."]
    run = discover_runs(tmp_path, "lora")[0]
    assert promote_to_final(run, "r").messages == ["r.safetensors already is the final file; nothing to copy."]


def test_keep_choice_writes_the_weight_where_the_card_reads_it(lora_root):
    folder = lora_root / "mychar"
    run = discover_runs(lora_root, "lora")[0]
    result = keep_choice(run, "mychar-000001", 0.6)
    assert result.final is None and result.sidecars == [folder / "mychar-000001.json"]
    assert json.loads((folder / "mychar-000001.json").read_text()) == {"sd version": "SD1", "preferred weight": 0.6}
    assert "preferred weight" not in json.loads((folder / "mychar.json").read_text())

    result = keep_choice(run, "mychar-000001", 0.8, promote=True)
    assert result.sidecars == [folder / "mychar-000001.json", folder / "mychar.json"]
    assert json.loads((folder / "mychar.json").read_text()) == {"sd version": "SD1", "activation text": "thing",
                                                               "notes": "mine", "preferred weight": 0.8}
    assert result.messages[-1] == "Preferred weight 0.8 written to mychar-000001.json and mychar.json."
    with pytest.raises(TrainerError, match=r"^files: 'nope' is not a file of the run"):
        keep_choice(run, "nope", 0.5)


def test_keeping_an_embedding_moves_its_pt_along(tmp_path):
    folder = tmp_path / "emb"
    new = write_safetensors(folder / "emb-000100.safetensors", {"modelspec.title": "emb-000100",
                                                                  "modelspec.trigger_phrase": "emb-000100"}, seed=1)
    (folder / "emb-000100.pt").write_bytes(b"pt of step 100")
    old = write_safetensors(folder / "emb.safetensors", {"modelspec.title": "emb"}, seed=2)
    (folder / "emb.pt").write_bytes(b"pt of the final")
    run = discover_runs(tmp_path, "embedding")[0]
    result = keep_choice(run, "emb-000100", 0.7, promote=True)
    assert result.kept_aside == folder / "emb-previous.safetensors"
    np.testing.assert_array_equal(data_of(folder / "emb.safetensors"), new)
    np.testing.assert_array_equal(data_of(folder / "emb-previous.safetensors"), old)
    assert read_metadata(folder / "emb.safetensors") == {"modelspec.title": "emb", "modelspec.trigger_phrase": "emb"}
    assert (folder / "emb.pt").read_bytes() == b"pt of step 100"
    assert (folder / "emb-previous.pt").read_bytes() == b"pt of the final"
    assert result.sidecars == [] and not (folder / "emb.json").exists()
    assert result.messages[-1] == "Embeddings have no preferred weight; write (emb:0.7) in the prompt."


def test_a_final_pt_without_a_new_one_is_removed_after_being_kept(tmp_path):
    write_safetensors(tmp_path / "e-000010.safetensors", seed=1)
    write_safetensors(tmp_path / "e.safetensors", seed=2)
    (tmp_path / "e.pt").write_bytes(b"old final pt")
    run = discover_runs(tmp_path, "embedding")[0]
    promote_to_final(run, "e-000010")
    assert not (tmp_path / "e.pt").exists() and (tmp_path / "e-previous.pt").read_bytes() == b"old final pt"


def test_only_safetensors_files_can_become_the_final(tmp_path):
    (tmp_path / "e-000010.pt").write_bytes(b"pt")
    write_safetensors(tmp_path / "e.safetensors")
    run = discover_runs(tmp_path, "embedding")[0]
    with pytest.raises(TrainerError, match=r"^files: e-000010.pt is not a .safetensors file"):
        promote_to_final(run, "e-000010")


def test_unreadable_headers_are_reported_by_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00")
    with pytest.raises(TrainerError, match=r"bad.safetensors is not a safetensors file \(it is shorter"):
        read_safetensors_header(bad)
    bad.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(TrainerError, match=r"header is not JSON"):
        read_safetensors_header(bad)
    bad.write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(TrainerError, match=r"bad header length"):
        read_safetensors_header(bad)
    assert read_metadata(bad) == {}  # discovery tolerates it: the file just has no metadata


# ---------------------------------------------------------------- the script's arguments (no WebUI needed)

def test_script_arguments_in_control_order_with_defaults():
    from lib_train.webui.grid.script import ARG_NAMES, DEFAULT_WEIGHTS, GridArgs

    assert ARG_NAMES == ["run", "files", "weights", "third_kind", "third_values", "draw_legend", "include_cells",
                         "keep_file", "keep_weight", "keep_promote", "mode"]
    a = GridArgs.from_args(["LoRA: mychar/mychar"])  # an API client may send fewer arguments
    assert (a.run, a.files, a.weights, a.third_kind, a.draw_legend, a.include_cells, a.mode) == \
        ("LoRA: mychar/mychar", [], DEFAULT_WEIGHTS, "Nothing", True, True, "grid")
    a = GridArgs.from_args(["r", "mychar-000001, mychar\nmychar-000002", None, "Seeds", "1", False, False,
                            "mychar", "0.7", True, " KEEP "])
    assert a.files == ["mychar-000001", "mychar", "mychar-000002"] and a.weights == DEFAULT_WEIGHTS
    assert (a.keep_file, a.keep_weight, a.keep_promote, a.mode) == ("mychar", 0.7, True, "keep")
    with pytest.raises(TrainerError, match=r"^mode: 'draw' is not 'grid' or 'keep'"):
        GridArgs.from_args(["r", [], "1", "Nothing", "", True, True, "", 1, False, "draw"])
    with pytest.raises(TrainerError, match=r"^keep_weight: 'heavy' is not a number"):
        GridArgs.from_args(["r", [], "1", "Nothing", "", True, True, "", "heavy"])
