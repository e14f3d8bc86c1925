"""Command line: ``python -m lib_train lora ...`` trains a LoRA, ``python -m lib_train embedding ...`` a
textual-inversion embedding, headless on a checkpoint file.

Settings come from the method's defaults, then ``--config FILE`` (JSON/TOML, same schema as the WebUI and the API),
then the flags given. Before any model work the dataset is scanned and the step count printed; during training a
progress bar shows ETA and loss. Ctrl-C, SIGTERM or SIGHUP (:mod:`lib_train.signals`) saves the LoRA/embedding and the
resume state and prints how to resume; a second one aborts without saving. The output folder is checked writable and
the output name locked (:mod:`lib_train.train.lock`) before the model loads.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from . import __version__, methods
from .config import (SECTIONS, TrainConfig, apply_family_defaults, from_dict, given_keys, method_default,
                     read_config_file, save_config, validate)
from .errors import ConfigError, Problem, TrainerError
from .methods import Method
from .settings import choices_of, declared, format_default


@dataclass(frozen=True)
class Flag:
    """One command-line flag, generated from a config setting (:mod:`lib_train.settings`)."""

    flag: str
    key: str  # "section.field"
    type: Any
    help: str  # as argparse shows it (percent signs doubled)
    choices: tuple | None = None  # enforced by argparse
    metavar: str | None = None
    split: str = ""  # this separator stands for a new line


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def flags_for(method: Method) -> list[Flag]:
    """The flags of ``method``'s sub-command: every setting with a flag that applies to it (not another method's
    section), in config order (the method's own section first where it says so); help with its defaults."""
    found = []
    for d in declared(SECTIONS):
        owner = methods.method_of(d.section)
        if d.spec.flag is None or not d.spec.applies_to(method.name) or owner not in (None, method):
            continue
        text = d.spec.help_for(method.name)
        if "{default}" in text:
            text = text.replace("{default}", format_default(method_default(method.name, d.key)))
        choices = choices_of(d.spec) if d.type is str and isinstance(d.spec.choices, tuple) and not d.spec.custom \
            else None
        metavar = d.spec.metavar or (choices and "{" + ",".join(choices) + "}") or d.name.upper()
        found.append(Flag(d.spec.flag, d.key, _bool if d.type is bool else d.type, text.replace("%", "%%"),
                          choices, metavar, d.spec.split))
    if method.own_flags_first:
        found.sort(key=lambda f: f.key.split(".")[0] != method.section)
    return found


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib_train", description=f"sd-webui-trainer {__version__}: train "
                                "LoRA networks (SD1.x/SD2.x/SDXL) and textual-inversion embeddings (SD1.x/SD2.x) "
                                "on checkpoint files, headless.")
    sub = p.add_subparsers(dest="command", required=True)
    for method in methods.METHODS.values():
        sp = sub.add_parser(method.name, help=method.cli_help[0].lower() + method.cli_help[1:-1],
                            description=f"{method.cli_help} Boolean flags alone mean true; they also take true/false.")
        sp.add_argument("--config", help="JSON or TOML config file (flags given here override it)")
        sp.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its NAME-state folder")
        sp.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1, ...")
        sp.add_argument("--dry-run", action="store_true", help="check settings and dataset, print the plan, exit")
        sp.add_argument("--write-config", metavar="FILE", help="write the resulting config to FILE and exit")
        for f in flags_for(method):
            extra = {"nargs": "?", "const": True, "metavar": "BOOL"} if f.type is _bool else {"metavar": f.metavar}
            sp.add_argument(f.flag, dest=f.key, type=f.type, default=None, choices=f.choices, help=f.help, **extra)
    return p


def _flag_values(args: argparse.Namespace, method: Method) -> dict[str, Any]:
    """The flags given: ``"section.field"`` → value."""
    given = {}
    for f in flags_for(method):
        value = getattr(args, f.key)
        if value is not None:
            if f.split:  # one line on a command line: the separator stands for a new line
                value = "\n".join(part.strip() for part in value.split(f.split))
            given[f.key] = value
    return given


def build_config(args: argparse.Namespace, method: Method | None = None) -> TrainConfig:
    """Defaults of the command's method, then ``--config``, then the flags given: the config is built once."""
    return _build(args, method or methods.get(args.command))[0]


def _build(args: argparse.Namespace, method: Method) -> tuple[TrainConfig, set[str]]:
    """:func:`build_config` and the settings the user gave (in the config file or as flags)."""
    data = read_config_file(args.config) if args.config else {}
    found = data.get("method", method.name)
    if isinstance(found, str) and found in methods.METHODS and found != method.name:
        raise ConfigError([Problem(f"method ({args.config})", f"the config file is for '{found}' training; "
                                                              f"run it with `python -m lib_train {found}`")])
    flags = _flag_values(args, method)
    return from_dict(data, default_method=method.name, overrides=flags), given_keys(data, flags)


class _CliEvents:
    """Progress bar on stderr (tqdm), status lines and warnings."""

    def __init__(self) -> None:
        self.bar = None

    def status(self, text: str) -> None:
        self._write(text)

    def warning(self, text: str) -> None:
        self._write(f"warning: {text}")

    def saved(self, path: str, kind: str) -> None:
        self._write(f"saved {kind}: {path}")

    def sampled(self, paths: list[str], step: int) -> None:
        folder = os.path.dirname(paths[0]) if paths else ""
        self._write(f"samples at step {step}: {len(paths)} image(s) in {folder}")

    def progress(self, p) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=p.total_steps, initial=p.step - 1, unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.bar.n = p.step
        post = {"epoch": f"{p.epoch}/{p.total_epochs}"}
        if p.loss is not None:
            post["loss"] = f"{p.loss:.4f}"
        if p.lr is not None:
            post["lr"] = f"{p.lr:.2e}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)


def run_command(args: argparse.Namespace, cmd: Method) -> int:
    from .devices import check_device
    from .train.state import load_state

    resume = None
    if args.resume:
        resume = load_state(args.resume)
        for note in resume.notes:
            print(note, file=sys.stderr)
        method = resume.state.config.get("method", "lora")
        if method != cmd.name:
            raise TrainerError(f"{args.resume} holds the resume state of a '{method}' run; resume it with "
                               f"`python -m lib_train {method} --resume {args.resume}`.")
        # flags given now override the saved settings (the saved ones are all the run's own: family defaults included)
        flags = _flag_values(args, cmd)
        cfg = from_dict(resume.state.config, default_method=cmd.name, overrides=flags)
        given = given_keys(resume.state.config, flags)
    else:
        cfg, given = _build(args, cmd)
    if args.write_config:
        save_config(cfg, args.write_config)
        print(f"wrote {args.write_config}")
        return 0
    device = check_device(args.device)  # a typo or a missing GPU: one line now, not a traceback after loading
    validate(cfg, headless=True)

    from .train.prepare import dataset_summary

    prepare_data, train = cmd.entry("prepare"), cmd.entry("train")
    prep = prepare_data(cfg)
    for line in dataset_summary(prep):
        print(line, file=sys.stderr)
    if args.dry_run:
        return 0

    from .models.load import load_bundle
    from .signals import StopSignals, exit_code, signal_name
    from .train.events import Commands
    from .train.lock import output_lock
    from .train.outputs import check_final_free, save_run_config
    from .train.storage import check_writable

    out_dir = cfg.output.output_dir
    check_writable(out_dir)  # before the model loads: a read-only or full folder is known at once
    if resume is None:
        check_final_free(cfg)
    commands = Commands()
    events = _CliEvents()

    def on_first(name: str) -> None:
        commands.request_stop()
        events.warning(f"{name}: stopping after this step, saving the {cmd.noun} and the resume state (Ctrl-C or "
                       f"another {name} aborts without saving)...")

    with StopSignals(on_first) as signals:
        os.makedirs(out_dir, exist_ok=True)
        with output_lock(out_dir, cfg.output.name, what=f"python -m lib_train {cmd.name}", say=events.warning):
            try:
                bundle = load_bundle(cfg, device, say=lambda line: print(line, file=sys.stderr, flush=True))
            except Exception as e:
                from .train.oom import is_out_of_memory, out_of_memory_message

                if is_out_of_memory(e):  # the checkpoint itself does not fit on the GPU
                    raise TrainerError(out_of_memory_message(e, cfg, device)) from None
                raise
            for note in apply_family_defaults(cfg, bundle.family_rules, given):
                print(f"  {note}", file=sys.stderr)
            save_run_config(cfg)
            signals.arm()
            try:
                result = train(cfg, bundle, prep, events=events, commands=commands, resume=resume)
            finally:
                events.close()
    truncated = getattr(bundle.encode_text, "truncated_captions", 0)
    if truncated:
        print(f"note: {truncated} caption encodings were longer than {cfg.data.max_token_length} tokens and were cut",
              file=sys.stderr)
    if result.status == "interrupted":
        by = f" by {signal_name(signals.received)}" if signals.received else ""
        print(f"Interrupted{by} at step {result.step}/{result.total_steps}.", file=sys.stderr)
        if result.final_file:
            print(f"  current {cmd.noun}: {result.final_file}", file=sys.stderr)
        if result.state_dir:
            print(f"  resume with: python -m lib_train {cmd.name} --resume {result.state_dir}", file=sys.stderr)
        return exit_code(signals.received) if signals.received else 130
    print(f"Finished {result.step} steps" + (f", final loss {result.last_loss:.4f}" if result.last_loss else "")
          + f". Final {cmd.noun}: {result.final_file}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command in methods.METHODS:
            return run_command(args, methods.METHODS[args.command])
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from .signals import SignalAbort

        if isinstance(e, SignalAbort):
            print(f"Aborted by {e}: nothing more was saved.", file=sys.stderr)
            return e.exit_code
        print("Aborted.", file=sys.stderr)
        return 130
    return 1
