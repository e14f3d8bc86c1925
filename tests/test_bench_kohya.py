"""bench/bench_kohya.py's parts that need no kohya: both tools' command lines carry the same settings (ours read back
through our own CLI parser), the training progress bar of each tool is told from the others in real tqdm output,
the ratio math, and a child run through the measuring loop (step stamps, peaks, the CUDA hook's signal)."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_kohya as bk  # noqa: E402

PATHS = bk.Paths(checkpoint="/ckpt/model.safetensors", data="/data", out="/out", tokenizers="/tok")


def _cases():
    return [bk.Case("sd1", 256, "unet", "cpu", "no", 8), bk.Case("sd1", 512, "unet+te", "cpu", "no", 8),
            bk.Case("sd1", 512, "unet+te", "cuda", "bf16", 30), bk.Case("sdxl", 1024, "unet", "cuda", "bf16", 30,
                                                                          checkpointing=True)]


def _kohya_args(cmd: list[str]) -> dict:
    """kohya's argv as flag -> value (True for a flag alone; a list where several values follow)."""
    args, key = {}, None
    for word in cmd[2:]:
        if word.startswith("--"):
            key = word[2:]
            args[key] = True
        elif args[key] is True:
            args[key] = word
        else:
            args[key] = [args[key], word] if isinstance(args[key], str) else [*args[key], word]
    return args


# what each shared setting is in our config (read back by our CLI's parser) and in kohya's argv
OUR_KEYS = {"resolution": "data.resolution", "buckets": "data.enable_buckets", "cache_latents": "data.cache_latents",
            "rank": "network.rank", "alpha": "network.alpha", "optimizer": "optim.optimizer",
            "optimizer_args": "optim.optimizer_args", "lr": "optim.lr", "te_lr": "optim.te_lr",
            "scheduler": "optim.scheduler", "warmup_steps": "optim.warmup_steps", "max_steps": "train.max_steps",
            "batch_size": "train.batch_size", "seed": "train.seed", "mixed_precision": "train.mixed_precision",
            "gradient_checkpointing": "train.gradient_checkpointing", "max_grad_norm": "optim.max_grad_norm",
            "noise_offset": "train.noise_offset", "min_snr_gamma": "train.min_snr_gamma",
            "caption_dropout": "data.caption_dropout", "max_token_length": "data.max_token_length",
            "clip_skip": "model.clip_skip", "save_precision": "output.save_precision"}


def _kohya_value(name: str, args: dict, case: bk.Case):
    """The value kohya runs with for setting ``name``, from its argv and its documented defaults."""
    if name == "resolution":
        w, h = args["resolution"].split(",")
        assert w == h
        return int(w)
    simple = {"rank": ("network_dim", int), "alpha": ("network_alpha", float), "optimizer": ("optimizer_type", str),
              "optimizer_args": ("optimizer_args", str), "lr": ("unet_lr", float), "scheduler": ("lr_scheduler", str),
              "warmup_steps": ("lr_warmup_steps", int), "max_steps": ("max_train_steps", int),
              "batch_size": ("train_batch_size", int), "seed": ("seed", int),
              "mixed_precision": ("mixed_precision", str),
              "max_grad_norm": ("max_grad_norm", float), "noise_offset": ("noise_offset", float),
              "caption_dropout": ("caption_dropout_rate", float), "save_precision": ("save_precision", str)}
    if name in simple:
        flag, kind = simple[name]
        return kind(args[flag])
    if name == "te_lr":
        assert ("text_encoder_lr" in args) != ("network_train_unet_only" in args)
        return float(args["text_encoder_lr"]) if "text_encoder_lr" in args else 0.0
    if name == "buckets":
        return "enable_bucket" in args
    if name == "gradient_checkpointing":
        return "gradient_checkpointing" in args
    if name == "cache_latents":
        return "memory" if "cache_latents" in args and "cache_latents_to_disk" not in args else "?"
    if name == "min_snr_gamma":
        return float(args.get("min_snr_gamma", 0.0))
    if name == "max_token_length":
        return int(args.get("max_token_length", 75))
    if name == "clip_skip":
        return int(args.get("clip_skip", 1))
    if name == "attention":
        return "sdpa" if "sdpa" in args and "xformers" not in args and "mem_eff_attn" not in args else "?"
    raise AssertionError(f"no reading of {name} from kohya's argv")


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_both_tools_get_the_same_settings(case):
    settings = bk.shared_settings(case)
    assert set(settings) == set(bk.OUR_FLAGS) == set(bk.KOHYA_FLAGS)
    ours = bk.our_command(case, PATHS, python="python")
    cfg = bk.check_ours_parses(ours)  # our CLI's own parser and config builder
    for name, key in OUR_KEYS.items():
        assert cfg[key] == settings[name], (name, cfg[key], settings[name])
    assert cfg["model.checkpoint"] == PATHS.checkpoint and cfg["data.train_dir"] == PATHS.data
    assert cfg["output.save_every_epochs"] == 0  # no save inside the timed steps
    assert "--device" in ours and ours[ours.index("--device") + 1] == case.device

    kohya = bk.kohya_command(case, PATHS, "kpython", "/kohya")
    assert kohya[1] == "/kohya/" + ("sdxl_train_network.py" if case.family == "sdxl" else "train_network.py")
    args = _kohya_args(kohya)
    for name, value in settings.items():
        assert _kohya_value(name, args, case) == value, name
    assert args["pretrained_model_name_or_path"] == PATHS.checkpoint and args["train_data_dir"] == PATHS.data
    assert args["max_data_loader_n_workers"] == "0" and args["tokenizer_cache_dir"] == PATHS.tokenizers
    assert args["network_module"] == "networks.lora"
    # UNet only: kohya's SDXL script caches the text encoders' outputs, as ours does by itself; its SD1 one cannot
    assert ("cache_text_encoder_outputs" in args) == (case.family == "sdxl" and case.te == "unet")


def test_cpu_matrix_is_fp32_and_gpu_matrix_has_the_sdxl_row():
    cpu = bk.build_cases("cpu", ["sd1", "sdxl"], None, ["unet", "unet+te"], 8, "bf16", None)
    assert [(c.resolution, c.te) for c in cpu] == [(256, "unet"), (256, "unet+te"), (512, "unet"), (512, "unet+te")]
    assert all(c.precision == "no" and not c.checkpointing for c in cpu)
    gpu = bk.build_cases("cuda", ["sd1", "sdxl"], None, ["unet"], 30, "bf16", None)
    assert [(c.family, c.resolution, c.precision, c.checkpointing) for c in gpu] == [
        ("sd1", 512, "bf16", False), ("sdxl", 1024, "bf16", True)]
    assert bk.build_cases("cpu", ["sd1"], [256], ["unet"], 8, "no", True)[0].checkpointing is True


def _tqdm_lines(**bar_kwargs) -> list[str]:
    """What a real tqdm bar writes for 3 updates, split as the parent splits a child's output."""
    from tqdm import tqdm

    buf = io.StringIO()
    bar = tqdm(file=buf, mininterval=0, **bar_kwargs)
    for _ in range(3):
        bar.update(1)
        bar.set_postfix({"avr_loss": 0.1})
    bar.close()
    return [line for line in buf.getvalue().replace("\r", "\n").split("\n") if line]


def test_each_tools_training_bar_is_found_and_no_other():
    kohya_train = _tqdm_lines(total=8, desc="steps", smoothing=0)
    kohya_cache = _tqdm_lines(total=8)  # kohya's latent caching bar: no desc, counted in it
    assert [bk.training_step("kohya", line, 8) for line in kohya_train][-1] == 3
    assert {bk.training_step("kohya", line, 8) for line in kohya_train} >= {1, 2, 3}
    assert all(bk.training_step("kohya", line, 8) is None for line in kohya_cache)
    assert all(bk.training_step("kohya", line, 9) is None for line in kohya_train)  # another total
    assert all(bk.training_step("ours", line, 8) is None for line in kohya_train + kohya_cache)


def test_our_cli_progress_bar_is_found(capsys):
    from lib_train.cli import _CliEvents
    from lib_train.train.events import Progress

    events = _CliEvents()
    for step in (1, 2, 3):
        events.progress(Progress(step=step, total_steps=8, epoch=1, total_epochs=2, loss=0.5, lr=1e-4,
                                 elapsed=float(step), eta=None))
    events.close()
    lines = capsys.readouterr().err.replace("\r", "\n").split("\n")
    assert {bk.training_step("ours", line, 8) for line in lines} - {None} == {0, 1, 2, 3}  # 0: the bar appears
    assert all(bk.training_step("kohya", line, 8) is None for line in lines)


def test_run_median_ratio_and_summary():
    stamps = {1: 10.0, 2: 13.0, 3: 14.0, 4: 16.0, 5: 19.0}  # step times: 2:3, 3:1, 4:2, 5:3
    assert bk.step_durations(stamps) == [3.0, 1.0, 2.0, 3.0]
    assert bk.run_median(stamps) == 2.0  # steps 3..5
    assert bk.run_median({1: 0.0, 2: 1.0}) is None
    assert bk.ratio(2.0, 4.0) == 0.5 and bk.ratio(None, 4.0) is None and bk.ratio(1.0, None) is None
    runs = []
    for rep, (ours, kohya) in enumerate([(2.0, 4.0), (3.0, 5.0), (10.0, 6.0)]):
        runs.append({"case": "c", "tool": "ours", "repeat": rep, "ok": True, "s_per_step": ours,
                     "peak_train_gib": 6.0, "peak_lifetime_gib": 7.0})
        runs.append({"case": "c", "tool": "kohya", "repeat": rep, "ok": True, "s_per_step": kohya,
                     "peak_train_gib": 8.0, "peak_lifetime_gib": 10.0})
    runs.append({"case": "c", "tool": "kohya", "repeat": 3, "ok": False, "s_per_step": 0.1})  # failed: left out
    s = bk.summarize("c", runs)
    assert s["repeats"] == {"ours": 3, "kohya": 3}
    assert s["s_per_step"] == {"ours": 3.0, "kohya": 5.0, "ratio": 0.6}  # medians over repeats, then the ratio
    assert s["peak_train_gib"]["ratio"] == 0.75 and s["peak_lifetime_gib"]["ratio"] == 0.7
    assert s["pair_ratios"] == pytest.approx([0.5, 0.6, 10 / 6])
    assert s["cuda_peak_gib"] == {"ours": None, "kohya": None, "ratio": None}
    assert "0.60" in bk.format_summary([s])


CHILD = textwrap.dedent("""
    import sys, time
    from tqdm import tqdm
    def hwm_kib():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
    blob = bytearray(64 * 2**20)  # 64 MiB, touched: resident
    for i in range(0, len(blob), 4096):
        blob[i] = 1
    del blob  # given back: the high-water mark stays 64 MiB above the resident size until the parent resets it
    print("caching"); sys.stdout.flush()
    for _ in tqdm(range(5), desc="steps", mininterval=0):
        pass
    # do not exit before the parent has handled step 1 (reset the mark, read it): a finished child has no mark left
    deadline = time.monotonic() + 120  # a parent that never resets fails the test's assertions, not hangs it
    while hwm_kib() > 48 * 1024 and time.monotonic() < deadline:
        time.sleep(0.01)
""")


@pytest.mark.parametrize("hook", [False, True], ids=["cpu", "cuda-hook"])
def test_run_child_stamps_every_step_and_reads_the_peaks(tmp_path, hook):
    hook_dir = None
    if hook:  # on a CPU the hook only proves it is loaded: SIGUSR1 would end a child without its handler
        hook_dir = tmp_path / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(bk.SITECUSTOMIZE)
    r = bk.run_child([sys.executable, "-c", CHILD], tool="kohya", steps=5, env=bk.child_env("cpu", 1),
                     cwd=str(tmp_path), log_path=tmp_path / "log.txt", cuda_hook=hook_dir)
    assert r["ok"] and r["returncode"] == 0 and r["steps_seen"] == 5, r.get("error")
    assert len(r["step_seconds"]) == 4 and r["s_per_step"] is not None and r["first_step_s"] is not None
    assert r["cpu_s_per_step"] is not None and r["cpu_s_per_step"] >= 0  # read from /proc at each step
    assert r["peak_lifetime_gib"] > 64 / 1024  # the child's own 64 MiB, from wait4
    assert r["peak_train_gib"] is not None and r["peak_train_gib"] <= r["peak_lifetime_gib"]
    assert "caching" in (tmp_path / "log.txt").read_text()
    if hook:
        written = json.loads((tmp_path / "log.cuda.json").read_text())
        assert written == {}  # loaded and ran; no CUDA here, so no counters


def test_a_signal_that_arrives_while_the_child_exits_does_not_kill_it(tmp_path):
    # The parent signals a child when its step 1 (CUDA peak reset) or a profile bound appears in the output; a fast
    # child may already be exiting then (a test child died with exit code -10 so). Python's finalisation, which
    # runs after the exit functions, puts every signal with a Python handler back to its default action (for these:
    # terminate) and leaves ignored ones ignored; so the hook's exit functions must leave all three ignored.
    import os
    import subprocess

    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(bk.SITECUSTOMIZE)
    child = textwrap.dedent("""
        import atexit, os, signal
        sigs = (signal.SIGUSR1, signal.SIGRTMIN + 1, signal.SIGRTMIN + 2)
        print("while running:", [callable(signal.getsignal(s)) for s in sigs])
        atexit._run_exitfuncs()  # what the interpreter runs first when it exits
        print("after the exit functions:", [signal.getsignal(s) == signal.SIG_IGN for s in sigs])
        for s in sigs:
            os.kill(os.getpid(), s)
        print("survived")
    """)
    env = dict(os.environ, PYTHONPATH=str(hook_dir), **{bk.CUDA_PEAK_ENV: str(tmp_path / "peak.json"),
                                                         bk.PROFILE_ENV: str(tmp_path / "profile.json")})
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.split("\n")[:3] == ["while running: [True, True, True]",
                                           "after the exit functions: [True, True, True]", "survived"]
    assert json.loads((tmp_path / "peak.json").read_text()) == {}


def test_a_failing_child_is_reported_with_its_log(tmp_path):
    r = bk.run_child([sys.executable, "-c", "import sys; print('no such model'); sys.exit(3)"], tool="ours",
                     steps=5, env=bk.child_env("cpu", 1), cwd=str(tmp_path), log_path=tmp_path / "log.txt")
    assert not r["ok"] and r["returncode"] == 3 and r["s_per_step"] is None
    assert "no such model" in r["error"] and "0/5 steps" in r["error"]


def test_a_step_is_stamped_when_its_bar_arrives_not_when_the_next_one_does():
    """tqdm ends a redraw with no newline (the next redraw starts with a carriage return): the step must be stamped
    at the arrival of its own write."""
    reader = bk.BarReader("kohya", 5)
    lines = _tqdm_lines(total=5, desc="steps", smoothing=0)
    first = next(line for line in lines if bk.training_step("kohya", line, 5) == 1)
    second = next(line for line in lines if bk.training_step("kohya", line, 5) == 2)
    assert reader.feed(("\r" + first).encode(), 1.0) == [1]  # unterminated, still counted now
    assert reader.feed(("\r" + first).encode(), 1.5) == []  # a redraw of the same step (postfix)
    half = second.index("|") + 1  # before the count
    assert reader.feed(("\r" + second[:half]).encode(), 2.0) == []  # a write split in two
    assert reader.feed(second[half:].encode(), 3.0) == [2]
    assert reader.stamps == {1: 1.0, 2: 3.0}


def test_the_checkpoint_file_is_fp16_in_the_ldm_layout_and_loads(tmp_path):
    """make_checkpoint at the tiny SD1 layout (kohya converts full-size layouts only; the code path is the same):
    the ldm keys, fp16 weights, the schedule buffers untouched, and our loader reads it back to the same weights."""
    import torch
    from safetensors.torch import load_file

    from lib_train.models.checkpoint import load_checkpoint

    path = tmp_path / "random.safetensors"
    bk.make_checkpoint(path, "sd1", tiny=True)
    sd = load_file(str(path))
    assert any(k.startswith("model.diffusion_model.") for k in sd)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in sd)
    assert any(k.startswith("first_stage_model.") for k in sd)
    weights = {k: v for k, v in sd.items() if k.startswith(bk.WEIGHT_PREFIXES) and v.is_floating_point()}
    assert weights and all(v.dtype == torch.float16 for v in weights.values())
    assert sd["alphas_cumprod"].dtype == torch.float32
    model, _ = load_checkpoint(path)
    reference = bk.random_model("sd1", tiny=True).state_dict()
    key = next(k for k in weights if k.endswith("attn1.to_q.weight"))
    assert torch.equal(model.state_dict()[key].half(), reference[key].half())


def test_lora_file_counts_modules_by_part_and_parameters(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "bench.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(16, 320), "lora_unet_a.lora_up.weight": torch.zeros(320, 16),
               "lora_unet_a.alpha": torch.tensor(8.0), "lora_te_b.lora_down.weight": torch.zeros(16, 768),
               "lora_te_b.lora_up.weight": torch.zeros(768, 16)}, str(path))
    assert bk.lora_file_counts(path) == {"unet": 1, "te": 1, "params": 2 * 16 * 320 + 2 * 16 * 768}
    assert bk.lora_file_counts(tmp_path / "missing.safetensors") is None


PROFILED_CHILD = textwrap.dedent("""
    import os, sys
    import torch
    from tqdm import tqdm
    out = os.environ["BENCH_KOHYA_PROFILE"]
    a = torch.randn(64, 64)
    for step in tqdm(range(1, 7), desc="steps", mininterval=0):  # the bar shows step n when step n has ended
        if step == 4:  # the start signal is sent when step 3's bar is read: wait until it has landed
            while not torch._C._autograd._profiler_enabled():
                a = torch.tanh(a)
        if step == 6:  # the stop signal is sent when step 5's bar is read: wait until it has landed
            while not os.path.exists(out):
                a = torch.tanh(a)
        for _ in range(20):
            a = torch.mm(a, a).tanh()
""")


def test_the_profile_window_is_opened_and_closed_by_signals_at_the_given_steps(tmp_path):
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(bk.SITECUSTOMIZE)
    r = bk.run_child([sys.executable, "-c", PROFILED_CHILD], tool="kohya", steps=6, env=bk.child_env("cpu", 1),
                     cwd=str(tmp_path), log_path=tmp_path / "log.txt", cuda_hook=hook_dir, profile=(3, 5))
    assert r["ok"], r.get("error")
    assert r["profile"] == str(tmp_path / "log.profile.json") and r["profile_steps"] == [3, 5]
    rows = {row["name"]: row for row in json.loads(Path(r["profile"]).read_text())}
    assert rows["aten::mm"]["count"] == 40  # steps 4 and 5's 20 products each, none of the others
    assert rows["aten::mm"]["self_us"] > 0 and rows["aten::tanh"]["count"] >= 40


def test_profile_table_puts_both_tools_per_step_side_by_side(tmp_path):
    def run(tool, repeat, ops):
        path = tmp_path / f"{tool}{repeat}.json"
        path.write_text(json.dumps([{"name": n, "count": 1, "self_us": us, "total_us": us} for n, us in ops.items()]))
        return {"tool": tool, "profile": str(path), "profile_steps": [3, 5]}

    runs = [run("ours", 0, {"aten::mm": 4e6, "aten::add": 1e6}), run("ours", 1, {"aten::mm": 6e6}),
            run("kohya", 0, {"aten::mm": 2e6, "aten::mul": 2e6, "aten::add": 2e5}), {"tool": "kohya", "profile": None}]
    rows = bk.profile_table(runs, top=2)
    table = {name: (ours, kohya) for name, ours, kohya in rows}
    assert table["aten::mm"] == (2.5, 1.0)  # per step (2 profiled steps): median of 2.0 and 3.0 s; kohya 1.0 s
    assert table["aten::mul"] == (0.0, 1.0)
    assert table["(all other ops)"] == pytest.approx((0.25, 0.1))  # add: median(0.5, 0.0 in the repeat without it)
    assert table["(total self time)"] == pytest.approx((2.75, 2.1))
    assert "+1.500" in bk.format_profile(rows)


def test_dry_run_reads_kohyas_sd1_parser_which_lacks_the_te_cache_flag(monkeypatch, capsys, tmp_path):
    # kohya's SD1 train_network.py defines no --cache_text_encoder_outputs (only its SDXL script does): the dry run
    # must say so, not die with a KeyError after our own parser has passed.
    seen = []

    def fake_kohya_parse(argv, python, kohya_dir):
        seen.append(argv)
        return {"max_train_steps": 8, "unet_lr": 1e-4, "text_encoder_lr": None, "network_train_unet_only": True,
                "network_dim": 16, "mixed_precision": "no", "sdpa": True, "gradient_checkpointing": False}

    monkeypatch.setattr(bk, "check_kohya_parses", fake_kohya_parse)
    rc = bk.main(["--dry-run", "--kohya-dir", str(tmp_path), "--kohya-python", sys.executable, "--work",
                  str(tmp_path), "--resolutions", "256", "--te", "unet"])
    out = capsys.readouterr().out
    assert rc == 0 and len(seen) == 1
    assert "kohya parses: steps 8, lr 0.0001, te_lr None, unet only True, rank 16" in out
    assert "TE outputs cached (no such flag in this script)" in out
    assert bk.describe_kohya_parse({"cache_text_encoder_outputs": True}).endswith("TE outputs cached True")
