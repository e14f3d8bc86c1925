"""The training configuration: typed, versioned, documented, JSON or TOML in and out.

One :class:`TrainConfig` describes a run completely; the command line, the WebUI tab and the API all fill the same
object, and a run folder stores it so a run can be resumed or repeated. Rules:

- every field has a default and a comment saying what it means;
- unknown keys are rejected by name (a typo never silently does nothing);
- :func:`validate` reports every problem at once, each naming the setting and its command-line flag;
- ``version`` is written to every file; :data:`MIGRATIONS` upgrades older files;
- ``method`` ("lora" or "embedding") picks what is trained; a few defaults differ by method
  (:data:`METHOD_DEFAULTS`), and each method ignores the other's section (``network`` / ``embedding``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .atomic import atomic_write_text, check_output_name
from .errors import ConfigError, Problem, TrainerError

CONFIG_VERSION = 3

METHODS = ("lora", "embedding")

PREDICTIONS = ("auto", "eps", "v")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
CACHE_MODES = ("memory", "disk", "off")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
TEMPLATES = ("subject", "style", "none")
MAX_VECTORS = 75  # one prompt chunk holds 75 token slots; an embedding's vectors must fit in one


@dataclass
class ModelConfig:
    checkpoint: str = ""  # headless only: a single-file SD1.x/SD2.x checkpoint (.safetensors or .ckpt)
    prediction: str = "auto"  # "auto" (detect), "eps" or "v" (SD2-768-v models)
    clip_skip: int = 1  # SD1: use the output of the N-th layer from the end (1 = last, 2 = the usual anime setting)


@dataclass
class DataConfig:
    train_dir: str = ""  # folder of images, with `N_name` repeat sub-folders (kohya convention)
    reg_dir: str = ""  # optional regularization images, same folder convention
    caption_extension: str = ".txt"  # caption file next to each image: <image stem><caption_extension>
    default_repeats: int = 1  # repeats for images in folders without an `N_` prefix
    resolution: int = 512  # training resolution (the bucket area is resolution²); a multiple of 64
    enable_buckets: bool = True  # aspect-ratio buckets instead of square center crops
    min_bucket_side: int = 256  # smallest bucket side in pixels
    max_bucket_side: int = 1024  # largest bucket side in pixels
    bucket_step: int = 64  # bucket sides are multiples of this
    bucket_no_upscale: bool = False  # never upscale small images; they get a bucket of their own size
    min_image_side: int = 64  # images with a smaller side are reported and skipped
    flip: bool = False  # random horizontal flip (do not use for asymmetric subjects or text)
    shuffle_caption: bool = False  # shuffle comma-separated tags each step
    keep_tokens: int = 0  # with shuffle: keep the first N tags in place (put the trigger word first)
    caption_dropout: float = 0.0  # probability of training a step with an empty caption
    tag_dropout: float = 0.0  # probability of dropping each (non-kept) tag
    max_token_length: int = 225  # 75, 150 or 225 tokens (1-3 chunks of 75, as the WebUI encodes long prompts)
    cache_latents: str = "memory"  # "memory", "disk" (reused across runs) or "off"


@dataclass
class NetworkConfig:
    rank: int = 16  # LoRA rank (network dim)
    alpha: float = 8.0  # LoRA alpha; the update is scaled by alpha / rank
    conv_rank: int = 0  # > 0 also trains 3x3 convolutions and ResBlock layers (LoCon)
    conv_alpha: float = 1.0  # alpha for the conv layers
    dropout: float = 0.0  # dropout on the LoRA branch input
    train_unet: bool = True  # train LoRA on the UNet
    init_from: str = ""  # optional: continue training from this existing LoRA file (same rank/modules)


@dataclass
class EmbeddingConfig:
    """Textual-inversion settings (``method = "embedding"``). The embedding's name is ``output.name``: prompts use it,
    and the WebUI names an embedding by its file stem. Template lines use ``[name]`` (the embedding) and
    ``[filewords]`` (the image's caption)."""

    init_text: str = "*"  # the vectors start as the token embeddings of this text ("" = zeros), e.g. "man in a jacket"
    vectors: int = 1  # vectors per token: the name takes this many of a prompt's 75 token slots (1-75)
    template: str = "subject"  # prompts: "subject", "style", "none" (the captions alone) or a .txt file of lines
    init_from: str = ""  # optional: continue from this embedding file (.safetensors/.pt) with the same vector count
    write_pt: bool = False  # also write the WebUI's .pt format next to every .safetensors


@dataclass
class OptimConfig:
    optimizer: str = "AdamW"  # AdamW, AdamW8bit, Lion, Lion8bit, DAdaptAdam, Prodigy, Adafactor
    optimizer_args: str = ""  # extra arguments, e.g. "weight_decay=0.01 betas=0.9,0.99"
    lr: float = 1e-4  # UNet learning rate (use 1.0 with DAdaptAdam / Prodigy)
    te_lr: float = 5e-5  # text-encoder learning rate; 0 = train the UNet only
    scheduler: str = "constant"  # constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial
    warmup_steps: int = 0  # linear warmup steps
    num_cycles: int = 1  # cosine_with_restarts: number of restarts
    power: float = 1.0  # polynomial: decay power
    grad_accum: int = 1  # gradient accumulation steps (effective batch = batch_size × grad_accum)
    max_grad_norm: float = 1.0  # clip the gradient norm (0 = off)
    allow_fallback: bool = False  # if the optimizer cannot run here (e.g. 8-bit on this GPU), use AdamW instead


@dataclass
class TrainingConfig:
    epochs: int = 10  # number of epochs (passes over images × repeats)
    max_steps: int = 0  # > 0: stop after this many optimizer steps instead of counting epochs
    batch_size: int = 1  # images per step
    seed: int = 42  # fixes data order, noise and initialisation: same seed + settings = same result
    mixed_precision: str = "auto"  # "auto" (bf16/fp16 on GPU, fp32 on CPU), "no", "fp16", "bf16"
    gradient_checkpointing: bool = False  # recompute activations in backward: much less memory, ~25% slower
    min_snr_gamma: float = 0.0  # min-SNR loss weighting (5 is common; 0 = off)
    noise_offset: float = 0.0  # noise offset (0.05-0.1 helps very dark/bright images; 0 = off)
    log_every: int = 10  # read the loss back from the device every N steps (each read is a sync)
    offload_vae: bool = True  # GPU: move the VAE to the CPU once latents are cached (frees its memory for training)


@dataclass
class OutputConfig:
    output_dir: str = ""  # where the files go
    name: str = ""  # file stem: name.safetensors, name-000001.safetensors, ...
    save_every_epochs: int = 1  # save name-<epoch>.safetensors every N epochs (0 = only the final file)
    save_every_steps: int = 0  # also save name-step<step>.safetensors every N steps (0 = off)
    save_precision: str = "fp16"  # dtype of the saved LoRA weights
    save_state_every_epochs: int = 0  # also save the full resume state every N epochs (it is always saved on interrupt)
    overwrite: bool = False  # replace an existing name.safetensors (otherwise the run refuses to start)
    trigger_words: str = ""  # activation text written to the .json sidecar
    comment: str = ""  # free text stored as ss_training_comment


@dataclass
class SampleConfig:
    """Sample images during a run: the same prompts and seed each time, so they show how training progresses. The
    last set also becomes the final file's ``.preview.png`` (the card picture in the WebUI)."""

    prompts: str = ""  # one prompt per line ([name] = the embedding, or the trigger words); empty = no samples
    every_epochs: int = 0  # sample after every N epochs (0 = off)
    every_steps: int = 0  # sample every N steps (0 = off); with prompts and both 0: one set at the end
    negative: str = ""  # negative prompt for every sample
    steps: int = 20  # sampling steps
    cfg_scale: float = 7.0  # classifier-free guidance scale
    seed: int = 1234  # the seed of every sample (fixed, so sets compare across steps)
    width: int = 0  # sample width in pixels (0 = data.resolution)
    height: int = 0  # sample height in pixels (0 = data.resolution)
    sampler: str = "Euler a"  # the WebUI's sampler name; headless runs use DDIM


@dataclass
class TrainConfig:
    version: int = CONFIG_VERSION
    method: str = "lora"
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


SECTIONS = {f.name: f.type for f in fields(TrainConfig) if f.name not in ("version", "method")}
_SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "network": NetworkConfig,
                    "embedding": EmbeddingConfig, "optim": OptimConfig, "train": TrainingConfig,
                    "output": OutputConfig, "sample": SampleConfig}

# Defaults that differ by method, applied before a file's or the command line's values.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {},
    "embedding": {"optim.lr": 5e-3, "output.save_precision": "fp32"},  # the WebUI's TI rate; embeddings are tiny
}


def _v1_to_v2(data: dict) -> None:
    """v2 added ``method = "embedding"`` and the ``[embedding]`` section; every v1 file is a valid v2 file."""


def _v2_to_v3(data: dict) -> None:
    """v3 added the ``[sample]`` section (off by default); every v2 file is a valid v3 file."""


# Older config versions → a function that upgrades the dict in place to the next version.
MIGRATIONS: dict[int, Callable[[dict], None]] = {1: _v1_to_v2, 2: _v2_to_v3}

# Setting → command-line flag, for messages (filled by the CLI module; a setting without a flag is named alone).
FLAGS: dict[str, str] = {}


def _label(key: str) -> str:
    flag = FLAGS.get(key)
    return f"{key} ({flag})" if flag else key


def default_config(method: str = "lora") -> TrainConfig:
    """A config with the defaults of ``method`` (:data:`METHOD_DEFAULTS`)."""
    cfg = TrainConfig(method=method)
    for key, value in METHOD_DEFAULTS.get(method, {}).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def from_dict(data: dict[str, Any], *, default_method: str = "lora") -> TrainConfig:
    """Build a config from a plain dict (JSON/TOML/API); ``method`` defaults to ``default_method``. Unknown
    sections or keys and wrong types raise :class:`ConfigError` naming every offending key."""
    data = json.loads(json.dumps(data))  # deep copy, plain types only
    problems: list[Problem] = []
    version = data.pop("version", CONFIG_VERSION)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ConfigError([Problem("version", f"config version {version!r} is newer than this trainer "
                                              f"understands ({CONFIG_VERSION}); update sd-webui-trainer")])
    while version < CONFIG_VERSION:
        MIGRATIONS[version](data)
        version += 1
    method = data.pop("method", default_method)
    cfg = default_config(method if isinstance(method, str) else "lora")
    cfg.method = method
    for section, values in data.items():
        cls = _SECTION_CLASSES.get(section)
        if cls is None:
            problems.append(Problem(section, f"unknown section; known sections: {', '.join(_SECTION_CLASSES)}"))
            continue
        if not isinstance(values, dict):
            problems.append(Problem(section, "must be a table/object of settings"))
            continue
        target = getattr(cfg, section)
        known = {f.name: f for f in fields(cls)}
        for key, value in values.items():
            name = f"{section}.{key}"
            if key not in known:
                problems.append(Problem(name, f"unknown setting; known settings in [{section}]: "
                                              f"{', '.join(known)}"))
                continue
            default = getattr(target, key)
            coerced = _coerce(value, type(default))
            if coerced is _BAD:
                problems.append(Problem(_label(name), f"expected {type(default).__name__}, got {value!r}"))
                continue
            setattr(target, key, coerced)
    if problems:
        raise ConfigError(problems)
    return cfg


_BAD = object()


def _coerce(value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        return _BAD
    if typ is int:
        if isinstance(value, bool):
            return _BAD
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                return _BAD
        return _BAD
    if typ is float:
        if isinstance(value, bool):
            return _BAD
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _BAD
        return _BAD
    if typ is str:
        return value if isinstance(value, str) else _BAD
    return value


# ----------------------------------------------------------------------------------------------- validation

def validate(cfg: TrainConfig, *, headless: bool = True) -> None:
    """Raise :class:`ConfigError` listing every invalid setting (paths that must exist are checked too)."""
    p: list[Problem] = []

    def bad(key: str, msg: str) -> None:
        p.append(Problem(_label(key), msg))

    if cfg.method not in METHODS:
        bad("method", f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    lora = cfg.method == "lora"
    m, d, o, t, out = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.output
    if headless:
        if not m.checkpoint:
            bad("model.checkpoint", "give the SD1.x/SD2.x checkpoint file to train on")
        elif not Path(m.checkpoint).is_file():
            bad("model.checkpoint", f"file not found: {m.checkpoint}")
    if m.prediction not in PREDICTIONS:
        bad("model.prediction", f"must be one of {', '.join(PREDICTIONS)}")
    if not 1 <= m.clip_skip <= 12:
        bad("model.clip_skip", "must be between 1 and 12 (1 = last layer, 2 = penultimate)")

    if not d.train_dir:
        bad("data.train_dir", "give the folder with the training images")
    elif not Path(d.train_dir).is_dir():
        bad("data.train_dir", f"folder not found: {d.train_dir}")
    if d.reg_dir and not Path(d.reg_dir).is_dir():
        bad("data.reg_dir", f"folder not found: {d.reg_dir}")
    if not d.caption_extension.startswith(".") or len(d.caption_extension) < 2:
        bad("data.caption_extension", "must start with a dot, e.g. '.txt' or '.caption'")
    if d.default_repeats < 1:
        bad("data.default_repeats", "must be at least 1")
    if d.resolution < 64 or d.resolution % 64:
        bad("data.resolution", f"{d.resolution} is not a multiple of 64 ≥ 64; use 512 (SD1), 768 (SD2-768) or "
                               "another multiple of 64")
    if d.bucket_step < 8 or d.bucket_step % 8:
        bad("data.bucket_step", "must be a multiple of 8 (64 recommended)")
    if d.min_bucket_side % max(d.bucket_step, 1) or d.max_bucket_side % max(d.bucket_step, 1):
        bad("data.min_bucket_side", "bucket sides must be multiples of data.bucket_step")
    if not 0 < d.min_bucket_side <= d.resolution <= d.max_bucket_side:
        bad("data.min_bucket_side", f"need min_bucket_side ≤ resolution ≤ max_bucket_side, got "
                                    f"{d.min_bucket_side} / {d.resolution} / {d.max_bucket_side}")
    if d.min_image_side < 8:
        bad("data.min_image_side", "must be at least 8 pixels")
    if d.keep_tokens < 0:
        bad("data.keep_tokens", "must be 0 or more")
    for key in ("caption_dropout", "tag_dropout"):
        if not 0.0 <= getattr(d, key) < 1.0:
            bad(f"data.{key}", "must be a probability in [0, 1)")
    if d.max_token_length not in (75, 150, 225):
        bad("data.max_token_length", "must be 75, 150 or 225")
    if d.cache_latents not in CACHE_MODES:
        bad("data.cache_latents", f"must be one of {', '.join(CACHE_MODES)}")

    if lora:
        _validate_network(cfg, bad)
    elif cfg.method == "embedding":
        _validate_embedding(cfg, bad)

    from .train.optim import OPTIMIZERS, parse_optimizer_args  # light imports (no optimizer library)

    names = {k.lower(): k for k in OPTIMIZERS}
    if o.optimizer.lower() not in names:
        bad("optim.optimizer", f"unknown optimizer {o.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    try:
        parse_optimizer_args(o.optimizer_args)
    except Exception as e:  # noqa: BLE001 - any parse failure is a user error here
        bad("optim.optimizer_args", str(e))
    from .train.schedule import SCHEDULERS

    if o.scheduler not in SCHEDULERS:
        bad("optim.scheduler", f"unknown scheduler {o.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if not o.lr > 0 or not math.isfinite(o.lr):
        bad("optim.lr", "must be a positive number (1e-4 is typical for AdamW; 1.0 for DAdaptAdam/Prodigy)")
    if lora and (o.te_lr < 0 or not math.isfinite(o.te_lr)):
        bad("optim.te_lr", "must be 0 (UNet only) or a positive number")
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

    if not out.output_dir:
        bad("output.output_dir", f"give the folder where the {'LoRA' if lora else 'embedding'} files are written")
    elif Path(out.output_dir).exists() and not Path(out.output_dir).is_dir():
        bad("output.output_dir", f"{out.output_dir} exists and is not a folder")
    msg = check_output_name(out.name)
    if msg:
        bad("output.name", msg)
    if out.save_every_epochs < 0 or out.save_every_steps < 0 or out.save_state_every_epochs < 0:
        bad("output.save_every_epochs", "save intervals must be 0 (off) or positive")
    if out.save_precision not in SAVE_PRECISIONS:
        bad("output.save_precision", f"must be one of {', '.join(SAVE_PRECISIONS)}")
    _validate_sample(cfg, bad)
    if p:
        raise ConfigError(p)


MAX_SAMPLE_PROMPTS = 16


def sample_prompt_lines(text: str) -> list[str]:
    """The sample prompts of ``sample.prompts``: one per non-blank line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _validate_sample(cfg: TrainConfig, bad: Callable[[str, str], None]) -> None:
    s = cfg.sample
    prompts = sample_prompt_lines(s.prompts)
    if s.every_epochs < 0 or s.every_steps < 0:
        bad("sample.every_epochs", "sample intervals must be 0 (off) or positive")
    if (s.every_epochs or s.every_steps) and not prompts:
        bad("sample.prompts", "give at least one sample prompt (one per line), or set the sample intervals to 0")
    if len(prompts) > MAX_SAMPLE_PROMPTS:
        bad("sample.prompts", f"{len(prompts)} prompts; use at most {MAX_SAMPLE_PROMPTS} (each costs a generation "
                              "every time samples are made)")
    if not 1 <= s.steps <= 150:
        bad("sample.steps", "must be between 1 and 150 (20 is typical)")
    if not 1.0 <= s.cfg_scale <= 30.0 or not math.isfinite(s.cfg_scale):
        bad("sample.cfg_scale", "must be between 1 and 30 (7 is typical)")
    for key in ("width", "height"):
        value = getattr(s, key)
        if value and (value < 64 or value % 8 or value > 2048):
            bad(f"sample.{key}", f"{value} is not a multiple of 8 between 64 and 2048 (0 = data.resolution)")
    if not s.sampler.strip():
        bad("sample.sampler", "give a sampler name such as 'Euler a' (headless runs always use DDIM)")


def _validate_network(cfg: TrainConfig, bad: Callable[[str, str], None]) -> None:
    n, o = cfg.network, cfg.optim
    if n.rank < 1:
        bad("network.rank", f"{n.rank} is not a valid rank; use a positive integer such as 8, 16 or 32")
    elif n.rank > 1024:
        bad("network.rank", "is larger than 1024; typical ranks are 4-128")
    if not n.alpha > 0 or not math.isfinite(n.alpha):
        bad("network.alpha", "must be a positive number (often rank/2 or 1)")
    if n.conv_rank < 0:
        bad("network.conv_rank", "must be 0 (off) or a positive integer")
    if n.conv_rank and not n.conv_alpha > 0:
        bad("network.conv_alpha", "must be a positive number")
    if not 0.0 <= n.dropout < 1.0:
        bad("network.dropout", "must be in [0, 1)")
    if n.init_from and not Path(n.init_from).is_file():
        bad("network.init_from", f"file not found: {n.init_from}")
    if not n.train_unet and o.te_lr == 0:
        bad("network.train_unet", "nothing to train: the UNet is off and the text-encoder learning rate is 0")


def _validate_embedding(cfg: TrainConfig, bad: Callable[[str, str], None]) -> None:
    from .embedding.prompts import load_template
    from .embedding.vectors import count_tokens

    e = cfg.embedding
    if not 1 <= e.vectors <= MAX_VECTORS:
        bad("embedding.vectors", f"{e.vectors} is not a valid vector count; use 1-{MAX_VECTORS} (each vector takes "
                                 "one of the 75 token slots of a prompt chunk; 1-8 is usual)")
    tokens = count_tokens(e.init_text)
    if tokens > MAX_VECTORS:
        bad("embedding.init_text", f"is {tokens} tokens long; it must fit one prompt chunk (75 tokens). Use a few "
                                   "words that describe the subject, e.g. 'man in a leather jacket'")
    try:
        load_template(e.template)
    except TrainerError as err:
        bad("embedding.template", str(err))
    if e.init_from and not Path(e.init_from).is_file():
        bad("embedding.init_from", f"file not found: {e.init_from}")
    if cfg.data.reg_dir:
        bad("data.reg_dir", "regularization images do not apply to embedding training (the model itself does not "
                            "change); remove this setting")


# ----------------------------------------------------------------------------------------------- files

def load_config(path: str | Path, *, default_method: str = "lora") -> TrainConfig:
    """Read a ``.json`` or ``.toml`` config file (``method`` defaults to ``default_method``)."""
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
    except ValueError as e:
        raise ConfigError([Problem(str(path), f"is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {e}")]) \
            from None
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "must contain a table/object of settings")])
    return from_dict(data, default_method=default_method)


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
