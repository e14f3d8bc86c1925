"""The training configuration: typed, versioned, documented, JSON or TOML in and out.

One :class:`TrainConfig` describes a run completely; the command line, the WebUI tab and the API all fill the same
object, and a run folder stores it so a run can be resumed or repeated. Rules:

- every field is declared once with :func:`~lib_train.settings.setting`: its default, its help, its command-line
  flag, its label and group in the Trainer tab, its choices and range (the CLI's flags and the tab's fields are
  generated from it);
- unknown keys are rejected by name (a typo never silently does nothing);
- :func:`validate` reports every problem at once, each naming the setting and its command-line flag;
- ``version`` is written to every file; :data:`MIGRATIONS` upgrades older files;
- ``method`` ("lora" or "embedding", :mod:`lib_train.methods`) picks what is trained; a few defaults differ by
  method (``Method.defaults``), and each method ignores the other's section (``network`` / ``embedding``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from . import methods
from .atomic import atomic_write_text, check_output_name
from .errors import ConfigError, Problem
from .sample_prompts import parse_prompts, prompt_lines
from .settings import (NAME_MAX, PATH_MAX, QUOTE_CHARS, Setting, choices_of, coerce, declared, format_default, limit_problem,
                       missing, path_problem, quote, setting)

CONFIG_VERSION = 3

# Closed choice sets (the optimizer and scheduler names are their registries', read when needed).
PREDICTIONS = ("auto", "eps", "v")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
CACHE_MODES = ("memory", "disk", "off")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
TEMPLATES = ("subject", "style", "none")
SPEED_SWITCH = ("auto", "on", "off")  # a speed switch: auto = on only where it was measured (or is known) to win
DEFAULT_BUCKET_SIDES = (256, 1024)  # kohya's smallest and largest bucket side; data.*_bucket_side = 0 means these
TOKEN_LENGTHS = (75, 150, 225)  # 1-3 chunks of 75 tokens, as the WebUI encodes long prompts
MAX_VECTORS = 75  # one prompt chunk holds 75 token slots; an embedding's vectors must fit in one
OPTIMIZERS_REF = "lib_train.train.optim:OPTIMIZERS"
SCHEDULERS_REF = "lib_train.train.schedule:SCHEDULERS"
_IN_A_FILE = "rarely changed: set it in a config file (--config)"
ANY = math.inf  # an open upper end of a setting's range


@dataclass
class ModelConfig:
    checkpoint: str = setting(
        "", "SD1.x/SD2.x/SDXL checkpoint file (.safetensors or .ckpt) to train on", flag="--checkpoint", path=True,
        not_in_ui="the WebUI trains the checkpoint that is loaded right now")
    webui_dir: str = setting(
        "", "SDXL: the WebUI folder whose repositories/generative-models holds sgm (default: $SD_WEBUI_DIR, else the "
            "WebUI this extension is installed in)", flag="--webui-dir", path=True,
        not_in_ui="inside the WebUI its own sgm is loaded already")
    prediction: str = setting(
        "auto", "what the model predicts: auto (read from the model), eps, or v (SD2-768-v, v-prediction SDXL "
                "fine-tunes)", flag="--prediction", label="Prediction type",
        choices=PREDICTIONS, group="training", ui_order=1)
    clip_skip: int = setting(
        1, "SD1: the text-encoder layer used, counted from the end (1 = last, 2 = penultimate; SD2 and SDXL use fixed "
           "layers)",
        flag="--clip-skip", label="Clip skip",
        group="training", ui_order=1, range=(1, 12))


@dataclass
class DataConfig:
    train_dir: str = setting(
        "", "folder holding one sub-folder per concept named N_name, N = repeats per epoch (e.g. data/10_mychar with "
            "*.png and .txt captions)",
        flag="--data", label="Dataset folder", group="dataset", path=True)
    reg_dir: str = setting(
        "", "class images without your subject, in the same N_name sub-folders (empty = none)", flag="--reg-data",
        label="Regularization folder (optional)", group="dataset", methods=("lora",), path=True)
    caption_extension: str = setting(
        ".txt", "extension of the caption file next to each image (default .txt)", flag="--caption-extension",
        group="dataset", label="Caption extension")
    default_repeats: int = setting(
        1, "repeats per epoch of images in folders without an N_ prefix (default 1)", flag="--repeats",
        label="Repeats of unnumbered folders", group="dataset", range=(1, ANY))
    resolution: int = setting(
        512, "training size in pixels, a multiple of 64: 512 for SD1, 768 for SD2-768, 1024 for SDXL (buckets keep "
             "about its area)", flag="--resolution", label="Resolution (px)", group="images", range=(64, ANY))
    enable_buckets: bool = setting(
        True, "train each image near its own aspect ratio (off: every image is resized and cropped to a square of the "
              "resolution; default on)",
        flag="--buckets", label="Aspect-ratio buckets",
        group="images")
    min_bucket_side: int = setting(
        0, "smallest bucket side in pixels (0 = auto: 256, or the resolution if that is smaller)", flag="--min-bucket",
        label="Min bucket side (px, 0 = auto)", group="images", range=(0, ANY))
    max_bucket_side: int = setting(
        0, "largest bucket side in pixels (0 = auto: 1024, or the resolution if that is larger)", flag="--max-bucket",
        label="Max bucket side (px, 0 = auto)", group="images", range=(0, ANY))
    bucket_step: int = setting(
        64, "bucket sides are multiples of this many pixels (a multiple of 8; default 64)", no_flag=_IN_A_FILE,
        label="Bucket step (px)", group="images", range=(8, ANY))
    bucket_no_upscale: bool = setting(
        False, "an image smaller than the resolution gets a bucket of its own size instead of being enlarged",
        flag="--bucket-no-upscale", label="Don't upscale small images", group="images")
    min_image_side: int = setting(
        64, "images whose shorter side is below this many pixels are listed by Scan and left out", no_flag=_IN_A_FILE,
        label="Min image side (px)", group="dataset", range=(8, ANY))
    flip: bool = setting(
        False, "mirror images at random (not for asymmetric subjects: text, a one-sided hair parting)", flag="--flip",
        label="Random horizontal flip",
        group="images")
    shuffle_caption: bool = setting(
        False, "shuffle the comma-separated tags of each caption every step", flag="--shuffle-caption",
        label="Shuffle tags", group="images")
    keep_tokens: int = setting(
        0, "with Shuffle tags: the first N tags stay in place (e.g. 1 for a trigger word; 0 = shuffle all)",
        flag="--keep-tokens", label="Keep first N tags", group="images", range=(0, ANY))
    caption_dropout: float = setting(
        0.0, "chance (0-1) that an image is trained with an empty caption in a step (0 = never)",
        flag="--caption-dropout", label="Caption dropout", group="images", range=(0.0, 1.0))
    tag_dropout: float = setting(
        0.0, "chance (0-1) that each tag is left out of a caption in a step (0 = never)", flag="--tag-dropout",
        label="Tag dropout", group="images", range=(0.0, 1.0))
    max_token_length: int = setting(
        225, "captions are cut after this many tokens: 75, 150 or 225 (1-3 prompt chunks)", flag="--max-token-length",
        choices=TOKEN_LENGTHS, label="Max caption tokens", group="images")
    cache_latents: str = setting(
        "memory", "encode the images with the VAE once: in memory, on disk (reused by later runs) or off (every "
                  "step)", flag="--cache-latents", choices=CACHE_MODES, label="Cache latents", group="images")
    prefetch: str = setting(
        "auto", "uncached latents: decode and augment the next images in a background thread while a step runs "
                "(auto = on a GPU whenever latents are not cached; on, off)", flag="--prefetch", choices=SPEED_SWITCH,
        label="Prefetch images in the background (uncached latents)",
        group="images")


@dataclass
class NetworkConfig:
    rank: int = setting(16, "LoRA rank (network dim): higher learns more detail and makes a larger file (1-1024, "
                            "default 16)", flag="--rank", label="Rank (dim)", group="network", range=(1, 1024))
    alpha: float = setting(8.0, "LoRA alpha: updates are scaled by alpha/rank (default 8; rank/2 or 1 are common)",
                           flag="--alpha", label="Alpha", group="network", range=(0.0, ANY))
    conv_rank: int = setting(0, "rank of the 3x3 convolutions and ResBlocks, trained as well when above 0 (LoCon; "
                                "0 = off)", flag="--conv-rank", label="Conv rank (LoCon, 0 = off)", group="network",
                             range=(0, ANY))
    conv_alpha: float = setting(1.0, "alpha of the conv layers: their updates are scaled by conv alpha/conv rank",
                                flag="--conv-alpha", label="Conv alpha", group="network", range=(0.0, ANY))
    dropout: float = setting(0.0, "chance (0-1) that each input value of a LoRA layer is dropped in a step (0 = off)",
                             flag="--network-dropout", label="Network dropout", group="network", range=(0.0, 1.0))
    train_unet: bool = setting(True, "train the UNet's LoRA layers (off: the text encoder's only; default on)",
                               flag="--train-unet", label="Train the UNet", group="network")
    init_from: str = setting("", "start from the weights of this LoRA file instead of new ones (empty = a new LoRA)",
                             flag="--init-lora", label="Continue from LoRA file", group="network", path=True)


@dataclass
class EmbeddingConfig:
    """Textual-inversion settings (``method = "embedding"``). The embedding's name is ``output.name``: prompts use it,
    and the WebUI names an embedding by its file stem. Template lines use ``[name]`` (the embedding) and
    ``[filewords]`` (the image's caption)."""

    init_text: str = setting(
        "*", "the vectors start as the token embeddings of this text, e.g. \"man in a leather jacket\" (\"\" = zeros; "
             "default *)", flag="--init-text", label="Initialization text", group="embedding")
    vectors: int = setting(
        1, "vectors per token: how many of a prompt's 75 token slots the name takes (1-75, default 1)",
        flag="--vectors", label="Vectors per token", group="embedding", range=(1, MAX_VECTORS))
    template: str = setting(
        "subject", "prompt templates: subject, style, none (the captions alone, which must contain NAME) or a .txt "
                   "file of lines with [name] and [filewords]", flag="--template", metavar="{subject,style,none,FILE}",
        choices=TEMPLATES, custom=True, label="Prompt template", group="embedding", path=True)
    init_from: str = setting(
        "", "continue training from this embedding file (.safetensors/.pt, same --vectors)", flag="--init-embedding",
        label="Continue from embedding file", group="embedding", path=True)
    write_pt: bool = setting(
        False, "also write the WebUI's .pt format next to every .safetensors", flag="--pt",
        label="Also write the WebUI .pt format", group="embedding")


@dataclass
class OptimConfig:
    optimizer: str = setting(
        "AdamW", "AdamW, AdamW8bit, Lion, Lion8bit, DAdaptAdam, Prodigy, Adafactor (8bit: less memory; DAdaptAdam "
                 "and Prodigy find the rate themselves: set the learning rate to 1)", flag="--optimizer",
        choices=OPTIMIZERS_REF, label="Optimizer", group="optim")
    optimizer_args: str = setting(
        "", "extra optimizer arguments as name=value, e.g. \"weight_decay=0.01 betas=0.9,0.99\" (empty = the "
            "optimizer's defaults)", flag="--optimizer-args", label="Optimizer arguments", group="optim",
        check="lib_train.train.optim:parse_optimizer_args")
    lr: float = setting(
        1e-4, "UNet learning rate (default {default}; DAdaptAdam/Prodigy: 1.0 unless set)", flag="--lr",
        label="Learning rate",
        group="optim", range=(0.0, ANY),
        method_help={"embedding": "learning rate of the embedding vectors (default {default}; DAdaptAdam/Prodigy: "
                                  "1.0 unless set)"})
    te_lr: float = setting(
        5e-5, "text-encoder learning rate (default {default}; 0 = UNet only; DAdaptAdam/Prodigy: the learning rate "
              "unless set)", flag="--te-lr",
        label="Text-encoder learning rate (0 = UNet only)", group="optim", methods=("lora",), range=(0.0, ANY))
    scheduler: str = setting(
        "constant", "how the learning rate changes during the run: constant, constant_with_warmup, linear, cosine, "
                    "cosine_with_restarts, polynomial", flag="--scheduler", choices=SCHEDULERS_REF,
        label="LR scheduler", group="optim")
    warmup_steps: int = setting(0, "steps over which the learning rate rises from 0 (every scheduler but constant; "
                                   "0 = none)", flag="--warmup", label="Warmup steps", group="optim", range=(0, ANY))
    num_cycles: int = setting(1, "cosine_with_restarts: how many times the rate restarts from the top (default 1)",
                              flag="--lr-cycles", label="Restart cycles", group="optim", range=(1, ANY))
    power: float = setting(1.0, "polynomial: the decay's power (1 = linear)", no_flag=_IN_A_FILE,
                           label="Polynomial power", group="optim")
    grad_accum: int = setting(1, "add up the gradients of N steps before each update: the batch size × N images "
                                 "per update for the memory of one batch", flag="--grad-accum",
                              label="Gradient accumulation steps", group="optim", range=(1, ANY))
    max_grad_norm: float = setting(1.0, "clip the gradients to this norm (default 1; 0 = no clipping)",
                                   flag="--max-grad-norm", label="Max gradient norm", group="optim", range=(0.0, ANY))
    allow_fallback: bool = setting(
        False, "use AdamW if the optimizer cannot run here", flag="--optimizer-fallback",
        label="Fall back to AdamW if the optimizer cannot run", group="optim")
    fused: str = setting(
        "auto", "AdamW: one fused kernel for the whole update (auto = on where torch has it: CUDA, and the CPU with "
                "torch 2.4+; on, off)", flag="--fused-optimizer",
        choices=SPEED_SWITCH, label="Fused AdamW", group="optim")


@dataclass
class TrainingConfig:
    epochs: int = setting(10, "passes over the dataset, each image as often as its folder's repeats (default 10)",
                          flag="--epochs", label="Epochs", group="training", range=(0, ANY))
    max_steps: int = setting(0, "stop after this many steps instead of counting epochs (0 = use epochs)",
                             flag="--steps", label="Max steps (0 = use epochs)", group="training", range=(0, ANY))
    batch_size: int = setting(1, "images per step: more is faster per image and needs more GPU memory (default 1)",
                              flag="--batch-size", label="Batch size", group="training", range=(1, ANY))
    seed: int = setting(42, "random seed: the same seed and settings give the same result", flag="--seed",
                        label="Seed", group="training")
    mixed_precision: str = setting("auto", "compute in fp16 or bf16 (GPU only): auto = bf16 where the GPU has it, "
                                           "else fp16; no = fp32", flag="--mixed-precision",
                                   choices=MIXED_PRECISIONS, label="Mixed precision", group="training")
    gradient_checkpointing: bool = setting(False, "trade ~25% speed for much less memory (default off; SDXL: on "
                                                  "unless set)", flag="--gradient-checkpointing",
                                           label="Gradient checkpointing", group="training")
    min_snr_gamma: float = setting(0.0, "weight each step's loss by min-SNR, which steadies training (5 is "
                                        "common; 0 = off)", flag="--min-snr-gamma", label="Min-SNR gamma",
                                   group="training", range=(0.0, ANY))
    noise_offset: float = setting(0.0, "add this offset to the noise so that very dark or bright images can be "
                                       "learned (0.05-0.1; 0 = off)", flag="--noise-offset", label="Noise offset",
                                  group="training", range=(0.0, 1.0))
    log_every: int = setting(10, "read the loss back from the GPU every N steps (each read waits for the GPU)",
                             no_flag=_IN_A_FILE, label="Loss read every N steps", group="training", range=(1, ANY))
    offload_vae: bool = setting(True, "GPU: move the VAE to the CPU once latents are cached (default on)",
                                flag="--offload-vae", label="Move the VAE to the CPU after caching latents",
                                group="training")
    compile: str = setting(
        "auto", "torch.compile of the UNet's repeated blocks (ResBlock, SpatialTransformer) for the run (auto = off "
                "until measured faster on a GPU; on, off); off with a notice where it cannot run", flag="--compile",
        choices=SPEED_SWITCH, label="torch.compile the UNet blocks", group="training")
    channels_last: str = setting(
        "auto", "channels-last memory format for the UNet's convolutions during the run (auto = on CUDA; on, off)",
        flag="--channels-last", choices=SPEED_SWITCH, label="Channels-last convolutions", group="training")


@dataclass
class OutputConfig:
    output_dir: str = setting(
        "", "folder the LoRA files are written to (in the WebUI, empty = a folder NAME in its Lora folder)",
        flag="--output", path=True, label="Output folder", group="output", ui_order=-2,
        method_help={"embedding": "folder the embedding files are written to (in the WebUI, empty = a folder "
                                  "NAME in its embeddings folder)"})
    name: str = setting(
        "", "name of the run's files: NAME.safetensors, and NAME-000001.safetensors, ... for the saves", flag="--name",
        label="Name", group="output", ui_order=-3,
        method_help={"embedding": "the embedding's name: the word prompts use, and its files' name (NAME.safetensors, "
                                  "and NAME-000500.safetensors, ... for the saves)"})
    save_every_epochs: int = setting(
        1, "save a copy NAME-<epoch>.safetensors after every N epochs (0 = only the final file)",
        flag="--save-every-epochs", label="Save every N epochs", group="output", range=(0, ANY),
        method_help={"embedding": "save a copy NAME-<step>.safetensors after every N epochs (0 = only the final "
                                  "file)"})
    save_every_steps: int = setting(
        0, "also save a copy NAME-step<step>.safetensors every N steps (0 = off)", flag="--save-every-steps",
        label="Save every N steps", group="output", range=(0, ANY),
        method_help={"embedding": "save a copy NAME-<step>.safetensors every N steps (0 = off)"})
    save_precision: str = setting(
        "fp16", "number format of the saved weights: fp16, bf16 or fp32", flag="--save-precision",
        choices=SAVE_PRECISIONS, label="Save precision", group="output",
        method_help={"embedding": "number format of the saved vectors: fp16, bf16 or fp32 (default {default})"})
    save_state_every_epochs: int = setting(
        0, "also save the resume state every N epochs (it is always saved on Ctrl-C)",
        flag="--save-state-every-epochs", label="Save resume state every N epochs", group="output", range=(0, ANY))
    overwrite: bool = setting(
        False, "replace an existing NAME.safetensors (off: a run with a taken name stops before training)",
        flag="--overwrite", label="Overwrite existing files", group="output",
        method_help={"embedding": "replace an existing NAME.safetensors / NAME.pt (off: a run with a taken name "
                                  "stops before training)"})
    trigger_words: str = setting(
        "", "the words that call up the LoRA in a prompt, stored in its metadata and .json file",
        flag="--trigger", label="Trigger words",
        group="output", ui_order=-1, methods=("lora",))
    comment: str = setting("", "free text stored in the file's metadata (ss_training_comment)", no_flag=_IN_A_FILE,
                           label="Comment", group="output")


@dataclass
class SampleConfig:
    """Sample images during a run: the same prompts and seed each time, so they show how training progresses. The
    last set also becomes the final file's ``.preview.png`` (the card picture in the WebUI)."""

    prompts: str = setting(
        "", "sample images of these prompts (separate prompts with a new line or ' | '; [name] = the trigger words "
            "or embedding; # starts a comment line). A line may end with its own options, kohya's syntax: "
            "--n negative prompt (to the next option), --w width, --h height, --s steps, --l CFG scale, --d seed, "
            "--ss sampler (WebUI only), e.g. 'a photo of [name] --n blurry, lowres --w 512 --h 768 --d 42'; "
            "the settings below apply to what a line does not set", flag="--sample-prompts", split=" | ",
        label="Sample prompts (one per line; [name] = embedding / trigger words)", group="samples", lines=3)
    every_epochs: int = setting(0, "make samples after every N epochs (0 = off)", flag="--sample-every-epochs",
                                label="Sample every N epochs", group="samples", range=(0, ANY))
    every_steps: int = setting(
        0, "make samples every N steps (0 = off; with prompts and no interval: one set at the end)",
        flag="--sample-every-steps", label="Sample every N steps", group="samples", range=(0, ANY))
    negative: str = setting("", "negative prompt of every sample (empty = none)", flag="--sample-negative",
                            label="Negative prompt", group="samples")
    steps: int = setting(20, "sampling steps per image (default 20; headless runs sample with DDIM)",
                         flag="--sample-steps", label="Sampling steps", group="samples", range=(1, 150))
    cfg_scale: float = setting(7.0, "how closely the samples follow the prompt (default 7)", flag="--sample-cfg",
                               label="CFG scale", group="samples", range=(1.0, 30.0))
    seed: int = setting(1234, "seed of the samples: fixed, so that the sets of a run compare", flag="--sample-seed",
                        label="Seed", group="samples")
    width: int = setting(0, "sample width in pixels, a multiple of 8 (0 = the training resolution)",
                         no_flag=_IN_A_FILE, label="Width (0 = resolution)", group="samples", range=(0, 2048))
    height: int = setting(0, "sample height in pixels, a multiple of 8 (0 = the training resolution)",
                          no_flag=_IN_A_FILE, label="Height (0 = resolution)", group="samples", range=(0, 2048))
    sampler: str = setting("Euler a", "the WebUI's sampler name, e.g. Euler a (headless runs use DDIM)",
                           no_flag="the WebUI's samplers; headless runs always use DDIM", label="Sampling method",
                           group="samples")


@dataclass
class TrainConfig:
    version: int = CONFIG_VERSION
    method: str = methods.DEFAULT_METHOD
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def copy(self) -> "TrainConfig":
        return from_dict(self.to_dict())


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(TrainConfig)  # type: ignore[misc]
                             if f.name not in ("version", "method")}
SETTINGS: dict[str, Setting] = {d.key: d.spec for d in declared(SECTIONS)}  # "section.field" → its declaration


def _v1_to_v2(data: dict) -> None:
    """v2 added ``method = "embedding"`` and the ``[embedding]`` section; every v1 file is a valid v2 file."""


def _v2_to_v3(data: dict) -> None:
    """v3 added the ``[sample]`` section (off by default); every v2 file is a valid v3 file."""


# Older config versions → a function that upgrades the dict in place to the next version.
MIGRATIONS: dict[int, Callable[[dict], None]] = {1: _v1_to_v2, 2: _v2_to_v3}


def label(key: str) -> str:
    """A setting as messages name it: ``network.rank (--rank)``; a setting without a flag alone."""
    spec = SETTINGS.get(key)
    return f"{key} ({spec.flag})" if spec is not None and spec.flag else key


def default_config(method: str = methods.DEFAULT_METHOD) -> TrainConfig:
    """A config with the defaults of ``method`` (``Method.defaults`` in :mod:`lib_train.methods`)."""
    cfg = TrainConfig(method=method)
    found = methods.METHODS.get(method)
    for key, value in (found.defaults if found else {}).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def method_default(method: str, key: str) -> Any:
    """The default of setting ``key`` (``"section.field"``) for ``method``."""
    section, name = key.split(".")
    return getattr(getattr(default_config(method), section), name)


def from_dict(data: dict[str, Any], *, default_method: str = methods.DEFAULT_METHOD,
              overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Build a config from a plain dict (JSON/TOML/API); ``method`` defaults to ``default_method``; ``overrides``
    (``"section.field"`` → value, e.g. command-line flags) replace the dict's values. Unknown sections or keys and
    wrong types raise :class:`ConfigError` naming every offending key."""
    data = json.loads(json.dumps(data))  # deep copy, plain types only
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        section_data = data.setdefault(section, {})
        if isinstance(section_data, dict):
            section_data[name] = value
    problems: list[Problem] = []
    version = data.pop("version", CONFIG_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > CONFIG_VERSION
        raise ConfigError([Problem("version", f"config version {quote(version)} is newer than this trainer "
                                              f"understands ({CONFIG_VERSION}); update sd-webui-trainer" if newer else
                                   f"{quote(version)} is no config version; versions are whole numbers from 1 to "
                                   f"{CONFIG_VERSION} (leave it out for the current one)")])
    while version < CONFIG_VERSION:
        MIGRATIONS[version](data)
        version += 1
    method = data.pop("method", default_method)
    if not isinstance(method, str):
        problems.append(Problem("method", f"must be the name of a method ({', '.join(methods.METHODS)}), got "
                                          f"{quote(method)}"))
        method = default_method
    cfg = default_config(method)
    cfg.method = method
    for section, values in data.items():
        cls = SECTIONS.get(section)
        if cls is None:
            problems.append(Problem(_short(section), f"unknown section; known sections: {', '.join(SECTIONS)}"))
            continue
        if not isinstance(values, dict):
            problems.append(Problem(section, "must be a table/object of settings"))
            continue
        target = getattr(cfg, section)
        known = {f.name: f for f in fields(cls)}
        for key, value in values.items():
            name = f"{section}.{key}"
            if key not in known:
                problems.append(Problem(f"{section}.{_short(key)}", f"unknown setting; known settings in [{section}]: "
                                              f"{', '.join(known)}"))
                continue
            try:
                setattr(target, key, coerce(value, type(getattr(target, key))))
            except ValueError as e:
                problems.append(Problem(label(name), str(e)))
    if problems:
        raise ConfigError(problems)
    optim_given = data.get("optim")
    adaptive_rates(cfg, set(optim_given) if isinstance(optim_given, dict) else set())
    return cfg


ADAPTIVE_LR = 1.0  # the usual learning rate of DAdaptation / Prodigy: a multiplier of the step size they estimate


def adaptive_rates(cfg: TrainConfig, given: set[str]) -> dict[str, float]:
    """DAdaptation and Prodigy take a learning rate near :data:`ADAPTIVE_LR` and one rate for every part they train:
    with one of them chosen, a rate not in ``given`` (the ``optim`` keys the user set) is set to that — the learning
    rate to 1.0, a trained text encoder's rate to the learning rate. Returns the ``"optim.*"`` values it changed (the
    tab applies the same rule when the optimizer is switched)."""
    if not methods.adaptive_optimizer(cfg.optim.optimizer):
        return {}
    changed: dict[str, float] = {}
    if "lr" not in given and cfg.optim.lr != ADAPTIVE_LR:
        cfg.optim.lr = changed["optim.lr"] = ADAPTIVE_LR
    if SETTINGS["optim.te_lr"].applies_to(cfg.method) and "te_lr" not in given and cfg.optim.te_lr not in (
            0, cfg.optim.lr):
        cfg.optim.te_lr = changed["optim.te_lr"] = cfg.optim.lr
    return changed


def _short(key: str) -> str:
    """An unknown key as a message names it: cut to :data:`~lib_train.settings.QUOTE_CHARS` characters."""
    return key if len(key) <= QUOTE_CHARS else key[:QUOTE_CHARS] + "…"


def bucket_sides(d: DataConfig) -> tuple[int, int]:
    """The smallest and largest bucket side a run uses: ``data.min_bucket_side`` / ``data.max_bucket_side``, where 0
    (their default) is :data:`DEFAULT_BUCKET_SIDES` moved out to take in ``data.resolution`` (so ``--resolution 64``
    or ``--resolution 2048`` alone works)."""
    low, high = DEFAULT_BUCKET_SIDES
    return (d.min_bucket_side or min(low, d.resolution), d.max_bucket_side or max(high, d.resolution))


def given_keys(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> set[str]:
    """The settings (``"section.field"``) a config dict and flag overrides set explicitly."""
    found = {f"{section}.{key}" for section, values in data.items() if isinstance(values, dict) for key in values}
    return found | set(overrides or {})


def apply_family_defaults(cfg: TrainConfig, family: Any, given: set[str]) -> list[str]:
    """Set the model family's own defaults (``Family.config_defaults``: SDXL turns gradient checkpointing on) on
    every such setting not in ``given`` (what the user set, :func:`given_keys`); returns a note per setting changed.
    A setting's declared default is the one of the families without a rule (its help says where a family differs)."""
    notes = []
    for key, value in family.config_defaults:
        section, name = key.split(".")
        if key in given or getattr(getattr(cfg, section), name) == value:
            continue
        setattr(getattr(cfg, section), name, value)
        shown = format_default(value)
        notes.append(f"{label(key)}: {shown} for {family.label} models (set it to override)")
    return notes


def text_encoders_train(cfg: TrainConfig) -> bool:
    """Do gradients reach the text encoders? (A LoRA with a text-encoder rate, or an embedding's vectors.)"""
    method = methods.METHODS.get(cfg.method)
    if method is not None and method.injects_vectors:
        return True
    return SETTINGS["optim.te_lr"].applies_to(cfg.method) and cfg.optim.te_lr > 0


def text_outputs_cached(cfg: TrainConfig) -> bool:
    """Can the text encoders' outputs be cached once (so the encoders leave the GPU)? Only when nothing trains them
    and every caption is the same text every step (no shuffling, no caption or tag dropout)."""
    d = cfg.data
    return not text_encoders_train(cfg) and not (d.shuffle_caption or d.caption_dropout or d.tag_dropout)


# ----------------------------------------------------------------------------------------------- validation

def _out_of_range(key: str, value: float) -> bool:
    low, high = SETTINGS[key].range  # type: ignore[misc]
    return not low <= value <= high


MAX_NAME_BYTES = NAME_MAX - 55
"""The longest ``output.name`` (UTF-8 bytes): the trainer adds up to 55 bytes to it in the names it writes (the
temporary name of ``NAME-step000001234.preview.png`` while it is written: ``.tmp-`` before, ``.`` and 8 random
characters after), and a file name holds at most :data:`~lib_train.settings.NAME_MAX` bytes."""


def shape_problems(cfg: TrainConfig) -> list[Problem]:
    """The limits every setting shares, for every setting (each float finite, each int in 64 bits, each text short
    and without NUL, each path one the file system can hold) and the length of ``output.name``: what must hold
    before any other check looks at a value or at the disk. :func:`from_dict` enforces the same limits on its inputs
    (:func:`~lib_train.settings.coerce`); this covers configs changed in code as well."""
    found = []
    if not isinstance(cfg.method, str):
        found.append(Problem("method", f"must be the name of a method ({', '.join(methods.METHODS)}), got "
                                       f"{quote(cfg.method)}"))
    for d in declared(SECTIONS):
        value = getattr(getattr(cfg, d.section), d.name)
        want = (int, float) if d.type is float else d.type
        if not isinstance(value, want) or (d.type is not bool and isinstance(value, bool)):
            found.append(Problem(label(d.key), f"expected {d.type.__name__}, got {quote(value)}"))
            continue
        problem = limit_problem(value) or (path_problem(value) if d.spec.path and value else None)
        if problem:
            found.append(Problem(label(d.key), problem))
    name = cfg.output.name
    if isinstance(name, str) and len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        found.append(Problem(label("output.name"), f"{quote(name)} is too long: names can have at most "
                                                   f"{MAX_NAME_BYTES} bytes (a file name holds {NAME_MAX}, and the "
                                                   "trainer adds suffixes such as '-step00001234.safetensors')"))
    elif not found and cfg.output.output_dir:
        longest = len(os.fsencode(os.path.join(cfg.output.output_dir, name))) + NAME_MAX - MAX_NAME_BYTES
        if longest > PATH_MAX:
            found.append(Problem(label("output.output_dir"), f"{quote(cfg.output.output_dir)} is too long for the "
                                                             f"files written in it (paths hold {PATH_MAX} bytes); "
                                                             "choose a shorter folder"))
    return found


def validate(cfg: TrainConfig, *, headless: bool = True) -> None:
    """Raise :class:`ConfigError` listing every invalid setting (paths that must exist are checked too). A value
    past the limits every setting shares (:func:`shape_problems`: NaN, a NUL byte, a path too long to exist) is
    reported alone, before anything looks at the disk with it."""
    shape = shape_problems(cfg)
    if shape:
        raise ConfigError(shape)
    p: list[Problem] = []

    def bad(key: str, msg: str) -> None:
        p.append(Problem(label(key), msg))

    method = methods.METHODS.get(cfg.method) if isinstance(cfg.method, str) else None
    if method is None:
        bad("method", f"unknown method {cfg.method!r}; choose one of {', '.join(methods.METHODS)}")
    m, d, o, t, out = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.output
    if headless:
        if not m.checkpoint:
            bad("model.checkpoint", "give the SD1.x/SD2.x/SDXL checkpoint file to train on")
        elif missing(m.checkpoint, "file"):
            bad("model.checkpoint", missing(m.checkpoint, "file"))
        if m.webui_dir and missing(m.webui_dir, "folder"):
            bad("model.webui_dir", f"{missing(m.webui_dir, 'folder')}; give the stable-diffusion-webui folder (the "
                                   "one holding repositories/generative-models)")
    if m.prediction not in PREDICTIONS:
        bad("model.prediction", f"must be one of {', '.join(PREDICTIONS)}")
    if _out_of_range("model.clip_skip", m.clip_skip):
        bad("model.clip_skip", "must be between 1 and 12 (1 = last layer, 2 = penultimate)")

    if not d.train_dir:
        bad("data.train_dir", "give the folder with the training images")
    elif missing(d.train_dir, "folder"):
        bad("data.train_dir", missing(d.train_dir, "folder"))
    if d.reg_dir and missing(d.reg_dir, "folder"):
        bad("data.reg_dir", missing(d.reg_dir, "folder"))
    if not d.caption_extension.startswith(".") or len(d.caption_extension) < 2:
        bad("data.caption_extension", f"{quote(d.caption_extension)} must start with a dot, e.g. '.txt' or "
                                      "'.caption'")
    elif not _EXTENSION_RE.match(d.caption_extension):
        bad("data.caption_extension", f"{quote(d.caption_extension)} is not a file extension: use a dot and up to "
                                      "16 letters, digits, '-' or '_', e.g. '.txt' or '.caption'")
    if d.default_repeats < 1:
        bad("data.default_repeats", "must be at least 1")
    if d.resolution < 64 or d.resolution % 64:
        bad("data.resolution", f"{d.resolution} is not a multiple of 64 ≥ 64; use 512 (SD1), 768 (SD2-768), 1024 "
                               "(SDXL) or another multiple of 64")
    if d.bucket_step < 8 or d.bucket_step % 8:
        bad("data.bucket_step", "must be a multiple of 8 (64 recommended)")
    _validate_buckets(d, bad)
    if d.min_image_side < 8:
        bad("data.min_image_side", "must be at least 8 pixels")
    if d.keep_tokens < 0:
        bad("data.keep_tokens", "must be 0 or more")
    for key in ("caption_dropout", "tag_dropout"):
        if not 0.0 <= getattr(d, key) < 1.0:
            bad(f"data.{key}", "must be a probability in [0, 1)")
    if d.max_token_length not in TOKEN_LENGTHS:
        bad("data.max_token_length", "must be 75, 150 or 225")
    if d.cache_latents not in CACHE_MODES:
        bad("data.cache_latents", f"must be one of {', '.join(CACHE_MODES)}")

    if method is not None:
        method.validate_section(cfg, bad)

    optimizers = choices_of(SETTINGS["optim.optimizer"]) or ()
    if o.optimizer.lower() not in {k.lower() for k in optimizers}:
        bad("optim.optimizer", f"unknown optimizer {o.optimizer!r}; choose one of {', '.join(optimizers)}")
    _check("optim.optimizer_args", o.optimizer_args, bad)
    schedulers = choices_of(SETTINGS["optim.scheduler"]) or ()
    if o.scheduler not in schedulers:
        bad("optim.scheduler", f"unknown scheduler {o.scheduler!r}; choose one of {', '.join(schedulers)}")
    if not o.lr > 0 or not math.isfinite(o.lr):
        bad("optim.lr", "must be a positive number (1e-4 is typical for AdamW; 1.0 for DAdaptAdam/Prodigy)")
    if o.warmup_steps < 0:
        bad("optim.warmup_steps", "must be 0 or more")
    if o.num_cycles < 1:
        bad("optim.num_cycles", "must be at least 1")
    if o.grad_accum < 1:
        bad("optim.grad_accum", "must be at least 1")
    if o.max_grad_norm < 0:
        bad("optim.max_grad_norm", "must be 0 (off) or positive")

    if t.epochs < 1 and t.max_steps < 1:
        bad("train.epochs", "must be at least 1 (or set train.max_steps)")
    if t.max_steps < 0:
        bad("train.max_steps", "must be 0 (use epochs) or positive")
    if t.batch_size < 1:
        bad("train.batch_size", "must be at least 1")
    if t.mixed_precision not in MIXED_PRECISIONS:
        bad("train.mixed_precision", f"must be one of {', '.join(MIXED_PRECISIONS)}")
    if t.min_snr_gamma < 0:
        bad("train.min_snr_gamma", "must be 0 (off) or positive (5 is common)")
    if t.noise_offset < 0 or t.noise_offset > 1:
        bad("train.noise_offset", "must be between 0 and 1 (0.05-0.1 is typical)")
    if t.log_every < 1:
        bad("train.log_every", "must be at least 1")
    for key in ("data.prefetch", "optim.fused", "train.compile", "train.channels_last"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) not in SPEED_SWITCH:
            bad(key, f"must be one of {', '.join(SPEED_SWITCH)} (auto = on where it is faster)")

    if not out.output_dir:
        bad("output.output_dir", f"give the folder where the {method.noun if method else 'output'} files are "
                                 "written")
    elif os.path.exists(out.output_dir) and not os.path.isdir(out.output_dir):
        bad("output.output_dir", f"{out.output_dir} exists and is not a folder")
    msg = check_output_name(out.name)
    if msg:
        bad("output.name", msg)
    for key in ("save_every_epochs", "save_every_steps", "save_state_every_epochs"):
        if getattr(out, key) < 0:
            bad(f"output.{key}", "must be 0 (off) or positive")
    if out.save_precision not in SAVE_PRECISIONS:
        bad("output.save_precision", f"must be one of {', '.join(SAVE_PRECISIONS)}")
    _validate_sample(cfg, bad)
    if p:
        raise ConfigError(p)


_EXTENSION_RE = re.compile(r"^(\.[A-Za-z0-9_-]{1,16})+$")


def _validate_buckets(d: DataConfig, bad: Callable[[str, str], None]) -> None:
    """Bucket sides matter only with buckets on; an explicit side must be a multiple of the step, and the resolution
    must lie between the two sides (0 = auto always does, :func:`bucket_sides`)."""
    for key in ("min_bucket_side", "max_bucket_side"):
        if getattr(d, key) < 0:
            bad(f"data.{key}", f"{getattr(d, key)} is negative; use 0 (auto) or a side in pixels")
    if not d.enable_buckets or d.min_bucket_side < 0 or d.max_bucket_side < 0:
        return
    for key in ("min_bucket_side", "max_bucket_side"):
        value = getattr(d, key)
        if value and d.bucket_step >= 8 and value % d.bucket_step:
            bad(f"data.{key}", f"{value} is not a multiple of data.bucket_step ({d.bucket_step})")
    low, high = bucket_sides(d)
    if low > d.resolution:
        bad("data.min_bucket_side", f"{low} is larger than data.resolution ({d.resolution}); lower it to at most "
                                    f"{d.resolution}, or set it to 0 (auto)")
    if high < d.resolution:
        bad("data.max_bucket_side", f"{high} is smaller than data.resolution ({d.resolution}); raise it to at least "
                                    f"{d.resolution}, or set it to 0 (auto)")


def _check(key: str, value: Any, bad: Callable[[str, str], None]) -> None:
    """Run the setting's own check (``Setting.check``) on ``value``."""
    from .settings import resolve

    try:
        resolve(SETTINGS[key].check)(value)
    except Exception as e:  # noqa: BLE001 - any failure of the check is a user error here
        bad(key, str(e))


MAX_SAMPLE_PROMPTS = 16


def sample_prompt_lines(text: str) -> list[str]:
    """The sample prompts of ``sample.prompts``: one per line, blank lines and ``#`` comments skipped (each line with
    its options: :mod:`lib_train.sample_prompts`)."""
    return [line for _, line in prompt_lines(text)]


def _validate_sample(cfg: TrainConfig, bad: Callable[[str, str], None]) -> None:
    s = cfg.sample
    prompts = sample_prompt_lines(s.prompts)
    for key in ("every_epochs", "every_steps"):
        if getattr(s, key) < 0:
            bad(f"sample.{key}", "must be 0 (off) or positive")
    if (s.every_epochs or s.every_steps) and not prompts:
        bad("sample.prompts", "give at least one sample prompt (one per line), or set the sample intervals to 0")
    if len(prompts) > MAX_SAMPLE_PROMPTS:
        bad("sample.prompts", f"{len(prompts)} prompts; use at most {MAX_SAMPLE_PROMPTS} (each costs a generation "
                              "every time samples are made)")
    if _out_of_range("sample.steps", s.steps):
        bad("sample.steps", "must be between 1 and 150 (20 is typical)")
    if _out_of_range("sample.cfg_scale", s.cfg_scale) or not math.isfinite(s.cfg_scale):
        bad("sample.cfg_scale", "must be between 1 and 30 (7 is typical)")
    for key in ("width", "height"):
        value = getattr(s, key)
        if value and (value < 64 or value % 8 or value > 2048):
            bad(f"sample.{key}", f"{value} is not a multiple of 8 between 64 and 2048 (0 = data.resolution)")
    for problem in parse_prompts(s.prompts)[1]:  # each line's own options ("sample prompt line 2: --w 513 …")
        bad("sample.prompts", problem)
    if not s.sampler.strip():
        bad("sample.sampler", "give a sampler name such as 'Euler a' (headless runs always use DDIM)")


# ----------------------------------------------------------------------------------------------- files

def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a ``.json`` or ``.toml`` config file as a plain dict (not checked yet)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem(str(path), f"cannot read the config file: {e}")]) from None
    try:
        if path.suffix.lower() == ".toml":
            data = _toml_loads(text)
        else:
            data = json.loads(text)
    except (ValueError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:300]
        raise ConfigError([Problem(str(path), f"is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {what}")]) \
            from None
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "must contain a table/object of settings")])
    return data


def load_config(path: str | Path, *, default_method: str = methods.DEFAULT_METHOD) -> TrainConfig:
    """Read a ``.json`` or ``.toml`` config file (``method`` defaults to ``default_method``)."""
    return from_dict(read_config_file(path), default_method=default_method)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write ``cfg`` as JSON or TOML (by extension), atomically."""
    path = Path(path)
    data = cfg.to_dict()
    text = dumps_toml(data) if path.suffix.lower() == ".toml" else json.dumps(data, indent=2) + "\n"
    return atomic_write_text(path, text)


def _toml_loads(text: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the WebUI's default; install.py adds tomli when it is missing
        import tomli as tomllib
    return tomllib.loads(text)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(data: dict[str, Any]) -> str:
    """TOML for our config shape: top-level scalars, then one table per section of scalars/lists."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, values in data.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
