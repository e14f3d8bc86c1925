"""Command line: ``python -m lib_train lora ...`` trains a LoRA, ``python -m lib_train embedding ...`` a
textual-inversion embedding, headless on a checkpoint file.

Settings come from the method's defaults, then ``--config FILE`` (JSON/TOML, same schema as the WebUI and the API),
then the flags given. Before any model work the dataset is scanned and the step count printed; during training a
progress bar shows ETA and loss; Ctrl-C saves the LoRA/embedding and the resume state and prints how to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .config import FLAGS, METHODS, TrainConfig, default_config, from_dict, load_config, save_config, validate
from .errors import ConfigError, Problem, TrainerError


@dataclass(frozen=True)
class Flag:
    flag: str
    key: str  # "section.field"
    type: Any
    help: str
    choices: tuple | None = None
    metavar: str | None = None


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


LORA_FLAGS: list[Flag] = [
    Flag("--checkpoint", "model.checkpoint", str, "SD1.x/SD2.x checkpoint file (.safetensors or .ckpt) to train on"),
    Flag("--prediction", "model.prediction", str, "prediction type: auto (detect), eps, or v (SD2-768-v models)",
         ("auto", "eps", "v")),
    Flag("--clip-skip", "model.clip_skip", int, "SD1: text-encoder layer from the end (1 = last, 2 = penultimate)"),
    Flag("--data", "data.train_dir", str, "folder of training images with N_name repeat sub-folders "
                                          "(e.g. data/10_mychar/*.png + .txt captions)"),
    Flag("--reg-data", "data.reg_dir", str, "optional folder of regularization images (same folder convention)"),
    Flag("--caption-extension", "data.caption_extension", str, "caption file extension (default .txt)"),
    Flag("--repeats", "data.default_repeats", int, "repeats for images in folders without an N_ prefix"),
    Flag("--resolution", "data.resolution", int, "training resolution, a multiple of 64 (512 for SD1, 768 for "
                                                 "SD2-768)"),
    Flag("--buckets", "data.enable_buckets", _bool, "aspect-ratio buckets on/off (default on)"),
    Flag("--min-bucket", "data.min_bucket_side", int, "smallest bucket side in pixels (default 256)"),
    Flag("--max-bucket", "data.max_bucket_side", int, "largest bucket side in pixels (default 1024)"),
    Flag("--bucket-no-upscale", "data.bucket_no_upscale", _bool, "never upscale small images"),
    Flag("--flip", "data.flip", _bool, "random horizontal flips (not for asymmetric subjects)"),
    Flag("--shuffle-caption", "data.shuffle_caption", _bool, "shuffle comma-separated tags every step"),
    Flag("--keep-tokens", "data.keep_tokens", int, "with shuffle: keep the first N tags in place"),
    Flag("--caption-dropout", "data.caption_dropout", float, "probability of an empty caption for a step"),
    Flag("--tag-dropout", "data.tag_dropout", float, "probability of dropping each tag"),
    Flag("--max-token-length", "data.max_token_length", int, "caption token limit: 75, 150 or 225"),
    Flag("--cache-latents", "data.cache_latents", str, "cache VAE latents: memory, disk (reused across runs) or off",
         ("memory", "disk", "off")),
    Flag("--rank", "network.rank", int, "LoRA rank / network dim (default 16)"),
    Flag("--alpha", "network.alpha", float, "LoRA alpha; updates are scaled by alpha/rank (default 8)"),
    Flag("--conv-rank", "network.conv_rank", int, "> 0 also trains 3x3 convs and ResBlocks (LoCon)"),
    Flag("--conv-alpha", "network.conv_alpha", float, "alpha of the conv layers"),
    Flag("--network-dropout", "network.dropout", float, "dropout on the LoRA input"),
    Flag("--train-unet", "network.train_unet", _bool, "train the UNet (default on)"),
    Flag("--init-lora", "network.init_from", str, "continue training from this LoRA file"),
    Flag("--optimizer", "optim.optimizer", str, "AdamW, AdamW8bit, Lion, Lion8bit, DAdaptAdam, Prodigy, Adafactor"),
    Flag("--optimizer-args", "optim.optimizer_args", str, "extra optimizer arguments, e.g. "
                                                          "\"weight_decay=0.01 betas=0.9,0.99\""),
    Flag("--lr", "optim.lr", float, "UNet learning rate (default 1e-4; 1.0 for DAdaptAdam/Prodigy)"),
    Flag("--te-lr", "optim.te_lr", float, "text-encoder learning rate (default 5e-5; 0 = UNet only)"),
    Flag("--scheduler", "optim.scheduler", str, "constant, constant_with_warmup, linear, cosine, "
                                                "cosine_with_restarts, polynomial"),
    Flag("--warmup", "optim.warmup_steps", int, "warmup steps"),
    Flag("--lr-cycles", "optim.num_cycles", int, "cosine_with_restarts: number of cycles"),
    Flag("--grad-accum", "optim.grad_accum", int, "gradient accumulation steps"),
    Flag("--max-grad-norm", "optim.max_grad_norm", float, "gradient-norm clipping (0 = off)"),
    Flag("--optimizer-fallback", "optim.allow_fallback", _bool, "use AdamW if the optimizer cannot run here"),
    Flag("--epochs", "train.epochs", int, "number of epochs (default 10)"),
    Flag("--steps", "train.max_steps", int, "stop after this many steps instead (0 = use epochs)"),
    Flag("--batch-size", "train.batch_size", int, "images per step (default 1)"),
    Flag("--seed", "train.seed", int, "random seed (same seed and settings = same result)"),
    Flag("--mixed-precision", "train.mixed_precision", str, "auto, no, fp16 or bf16 (GPU only)",
         ("auto", "no", "fp16", "bf16")),
    Flag("--gradient-checkpointing", "train.gradient_checkpointing", _bool, "trade ~25%% speed for much less "
                                                                            "memory"),
    Flag("--min-snr-gamma", "train.min_snr_gamma", float, "min-SNR loss weighting (5 is common; 0 = off)"),
    Flag("--noise-offset", "train.noise_offset", float, "noise offset (0.05-0.1; 0 = off)"),
    Flag("--offload-vae", "train.offload_vae", _bool, "GPU: move the VAE to the CPU once latents are cached "
                                                      "(default on)"),
    Flag("--output", "output.output_dir", str, "output folder"),
    Flag("--name", "output.name", str, "output name: NAME.safetensors, NAME-000001.safetensors, ..."),
    Flag("--save-every-epochs", "output.save_every_epochs", int, "save NAME-<epoch> every N epochs (0 = off)"),
    Flag("--save-every-steps", "output.save_every_steps", int, "also save NAME-step<step> every N steps"),
    Flag("--save-precision", "output.save_precision", str, "fp16, bf16 or fp32", ("fp16", "bf16", "fp32")),
    Flag("--save-state-every-epochs", "output.save_state_every_epochs", int,
         "also save the resume state every N epochs (it is always saved on Ctrl-C)"),
    Flag("--trigger", "output.trigger_words", str, "trigger words (stored in the metadata and .json sidecar)"),
    Flag("--overwrite", "output.overwrite", _bool, "replace an existing NAME.safetensors"),
    Flag("--sample-prompts", "sample.prompts", str, "sample images of these prompts (separate prompts with a new "
                                                    "line or ' | '; [name] = the trigger words or embedding)"),
    Flag("--sample-every-epochs", "sample.every_epochs", int, "make samples after every N epochs (0 = off)"),
    Flag("--sample-every-steps", "sample.every_steps", int, "make samples every N steps (0 = off; with prompts and "
                                                            "no interval: one set at the end)"),
    Flag("--sample-negative", "sample.negative", str, "negative prompt of the samples"),
    Flag("--sample-steps", "sample.steps", int, "DDIM steps per sample (default 20)"),
    Flag("--sample-cfg", "sample.cfg_scale", float, "guidance scale of the samples (default 7)"),
    Flag("--sample-seed", "sample.seed", int, "seed of the samples (fixed, so sets compare)"),
]
_LORA_ONLY = {"--reg-data", "--rank", "--alpha", "--conv-rank", "--conv-alpha", "--network-dropout", "--train-unet",
              "--init-lora", "--te-lr", "--trigger"}
_EMBEDDING_HELP = {
    "--lr": "learning rate of the embedding vectors (default 5e-3; 1.0 for DAdaptAdam/Prodigy)",
    "--name": "embedding name = the word prompts use = the file stem: NAME.safetensors, NAME-000500.safetensors",
    "--save-every-epochs": "save NAME-<step> at the end of every N epochs (0 = off)",
    "--save-every-steps": "save NAME-<step> every N steps (0 = off)",
    "--save-precision": "fp16, bf16 or fp32 (default fp32)",
    "--overwrite": "replace an existing NAME.safetensors / NAME.pt",
}
EMBEDDING_FLAGS: list[Flag] = [
    Flag("--init-text", "embedding.init_text", str, "the vectors start as the token embeddings of this text, e.g. "
                                                    "\"man in a leather jacket\" (\"\" = zeros; default *)"),
    Flag("--vectors", "embedding.vectors", int, "vectors per token: how many of a prompt's 75 token slots the name "
                                                "takes (1-75, default 1)"),
    Flag("--template", "embedding.template", str, "prompt templates: subject, style, none (the captions alone, "
                                                  "which must contain NAME) or a .txt file of lines with [name] and "
                                                  "[filewords]", metavar="{subject,style,none,FILE}"),
    Flag("--init-embedding", "embedding.init_from", str, "continue training from this embedding file "
                                                         "(.safetensors/.pt, same --vectors)"),
    Flag("--pt", "embedding.write_pt", _bool, "also write the WebUI's .pt format next to every .safetensors"),
] + [dataclasses.replace(f, help=_EMBEDDING_HELP.get(f.flag, f.help)) for f in LORA_FLAGS
     if f.flag not in _LORA_ONLY]
for _f in LORA_FLAGS + EMBEDDING_FLAGS:
    FLAGS[_f.key] = _f.flag


@dataclass(frozen=True)
class Command:
    name: str  # the sub-command and the config's method
    noun: str  # what a run produces, for messages
    flags: list[Flag]
    help: str


COMMANDS = {
    "lora": Command("lora", "LoRA", LORA_FLAGS, "Train a kohya-format LoRA."),
    "embedding": Command("embedding", "embedding", EMBEDDING_FLAGS,
                         "Train a textual-inversion embedding (WebUI/ComfyUI/diffusers format)."),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib_train", description=f"sd-webui-trainer {__version__}: train "
                                "LoRA networks and textual-inversion embeddings on SD1.x/SD2.x checkpoints headless.")
    sub = p.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help[0].lower() + cmd.help[1:-1],
                            description=f"{cmd.help} Boolean flags alone mean true; they also take true/false.")
        sp.add_argument("--config", help="JSON or TOML config file (flags given here override it)")
        sp.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its NAME-state folder")
        sp.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1, ...")
        sp.add_argument("--dry-run", action="store_true", help="check settings and dataset, print the plan, exit")
        sp.add_argument("--write-config", metavar="FILE", help="write the resulting config to FILE and exit")
        for f in cmd.flags:
            extra = {"nargs": "?", "const": True, "metavar": "BOOL"} if f.type is _bool else {"metavar": f.metavar or (f.choices and "{" + ",".join(f.choices) + "}") or f.key.split(".")[1].upper()}
            sp.add_argument(f.flag, dest=f.key, type=f.type, default=None, choices=f.choices, help=f.help, **extra)
    return p


def _apply_flags(data: dict, args: argparse.Namespace, cmd: Command) -> dict:
    for f in cmd.flags:
        value = getattr(args, f.key)
        if value is not None:
            section, key = f.key.split(".")
            if f.key == "sample.prompts":  # one line on a command line: ' | ' separates prompts
                value = "\n".join(part.strip() for part in value.split(" | "))
            data[section][key] = value
    return data


def build_config(args: argparse.Namespace, cmd: Command | None = None) -> TrainConfig:
    """Defaults of the command's method, then ``--config``, then the flags given."""
    cmd = cmd or COMMANDS[args.command]
    cfg = load_config(args.config, default_method=cmd.name) if args.config else default_config(cmd.name)
    if cfg.method in METHODS and cfg.method != cmd.name:
        raise ConfigError([Problem(f"method ({args.config})", f"the config file is for '{cfg.method}' training; "
                                                              f"run it with `python -m lib_train {cfg.method}`")])
    return from_dict(_apply_flags(cfg.to_dict(), args, cmd), default_method=cmd.name)


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


def run_command(args: argparse.Namespace, cmd: Command) -> int:
    from .train.state import load_state

    resume = None
    if args.resume:
        resume = load_state(args.resume)
        method = resume.state.config.get("method", "lora")
        if method != cmd.name:
            raise TrainerError(f"{args.resume} holds the resume state of a '{method}' run; resume it with "
                               f"`python -m lib_train {method} --resume {args.resume}`.")
        data = _apply_flags(resume.state.config, args, cmd)  # flags given now override the saved settings
        cfg = from_dict(data, default_method=cmd.name)
    else:
        cfg = build_config(args, cmd)
    if args.write_config:
        save_config(cfg, args.write_config)
        print(f"wrote {args.write_config}")
        return 0
    validate(cfg, headless=True)

    from .train.prepare import dataset_summary

    if cmd.name == "lora":
        from .train.lora_trainer import prepare_data
        from .train.lora_trainer import train_lora as train
    else:
        from .train.ti_trainer import prepare_embedding_data as prepare_data
        from .train.ti_trainer import train_embedding as train

    prep = prepare_data(cfg)
    for line in dataset_summary(prep):
        print(line, file=sys.stderr)
    if args.dry_run:
        return 0

    from .models.load import load_bundle, resolve_device
    from .train.events import Commands

    bundle = load_bundle(cfg, resolve_device(args.device), say=lambda line: print(line, file=sys.stderr, flush=True))
    out_dir = Path(cfg.output.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / f"{cfg.output.name}.config.json")

    commands = Commands()
    events = _CliEvents()

    def on_sigint(signum, frame):
        if commands.stop_requested():
            raise KeyboardInterrupt
        commands.request_stop()
        events.warning(f"Stopping after this step: saving the {cmd.noun} and the resume state (Ctrl-C again to "
                       "abort without saving)...")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = train(cfg, bundle, prep, events=events, commands=commands, resume=resume)
    finally:
        signal.signal(signal.SIGINT, previous)
        events.close()
    truncated = getattr(bundle.encode_text, "truncated_captions", 0)
    if truncated:
        print(f"note: {truncated} caption encodings were longer than {cfg.data.max_token_length} tokens and were cut",
              file=sys.stderr)
    if result.status == "interrupted":
        print(f"Interrupted at step {result.step}/{result.total_steps}.", file=sys.stderr)
        if result.final_file:
            print(f"  current {cmd.noun}: {result.final_file}", file=sys.stderr)
        if result.state_dir:
            print(f"  resume with: python -m lib_train {cmd.name} --resume {result.state_dir}", file=sys.stderr)
        return 130
    print(f"Finished {result.step} steps" + (f", final loss {result.last_loss:.4f}" if result.last_loss else "")
          + f". Final {cmd.noun}: {result.final_file}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command in COMMANDS:
            return run_command(args, COMMANDS[args.command])
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Aborted.", file=sys.stderr)
        return 130
    return 1
