"""Optimizers: a registry of library classes, free-form argument parsing/validation, and a one-step capability probe.

Each optimizer comes from its own library (DESIGN.md "Optimizers"), imported only when used, so a missing optional
package costs nothing until it is chosen. Whether an optimizer actually runs on this machine (bitsandbytes before
0.50 fails ``step()`` on the CPU with "All input tensors need to be on the same GPU"; the WebUI's torch 2.1.2 only
gets a GPU-only bitsandbytes, WEBUI.md §9) is found out by :func:`probe_optimizer`, which runs one real step on a
tiny parameter; :func:`resolve_optimizer` falls back to AdamW only when the user allows it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_train.errors import TrainerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer: where its class lives and how to talk about it."""

    name: str  # the name users type and the UI shows (matched case-insensitively)
    module: str  # import path of the module holding the class
    attr: str  # class name in that module
    package: str  # pip package that provides ``module`` (for messages and install.py)
    adaptive: bool = False  # estimates its own step size (DAdaptation, Prodigy): use lr = 1.0
    defaults: dict[str, Any] = field(default_factory=dict, hash=False)  # keyword defaults the user may override

    def load_class(self) -> type[torch.optim.Optimizer]:
        """Import the optimizer class; a missing or broken library raises :class:`TrainerError` with the fix."""
        top = self.module.split(".")[0]
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] == top:
                raise TrainerError(
                    f"Optimizer {self.name} needs the Python package '{self.package}', which is not installed. "
                    f"Install it with `pip install {self.package}` in the WebUI's Python environment (in the WebUI: "
                    "restart it so the extension's install.py adds it), or choose another optimizer."
                ) from err
            raise self._broken(err) from err
        except Exception as err:  # a library that is installed but fails while importing (e.g. a CUDA setup error)
            raise self._broken(err) from err
        return getattr(module, self.attr)

    def _broken(self, err: Exception) -> TrainerError:
        return TrainerError(
            f"Optimizer {self.name}: the package '{self.package}' is installed but cannot be imported "
            f"({type(err).__name__}: {err}). Reinstall it with `pip install -U {self.package}` or choose another "
            "optimizer."
        )


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("AdamW", "torch.optim", "AdamW", "torch"),
        OptimizerSpec("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
        OptimizerSpec("Lion", "lion_pytorch", "Lion", "lion-pytorch"),
        OptimizerSpec("Lion8bit", "bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
        OptimizerSpec("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadaptation", adaptive=True),
        OptimizerSpec("Prodigy", "prodigyopt", "Prodigy", "prodigyopt", adaptive=True),
        # relative_step=False (and the two options that need it) so the explicit lr and our schedule apply
        OptimizerSpec(
            "Adafactor",
            "transformers.optimization",
            "Adafactor",
            "transformers",
            defaults={"relative_step": False, "scale_parameter": False, "warmup_init": False},
        ),
    )
}

FALLBACK = "AdamW"
_RESERVED = {"params": "it is set by the trainer", "lr": "set it with the learning-rate setting instead"}
_PROBE_SHAPE = (64, 128)  # 8192 elements: above bitsandbytes' min_8bit_size (4096), so the 8-bit path is tested


def get_optimizer_spec(name: str) -> OptimizerSpec:
    """The registry entry for ``name`` (case-insensitive); unknown names raise :class:`TrainerError` listing all."""
    for spec in OPTIMIZERS.values():
        if spec.name.lower() == name.strip().lower():
            return spec
    raise TrainerError(f"Unknown optimizer {name!r}. Choose one of: {', '.join(OPTIMIZERS)}.")


def _parse_value(key: str, raw: str) -> Any:
    """Type one value: True/False, None, comma list → tuple of floats, int, float, else a (unquoted) string."""
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if "," in raw:
        try:
            return tuple(float(part) for part in raw.split(","))
        except ValueError:
            raise TrainerError(
                f"Optimizer args: {key}={raw} is a comma list, which must hold numbers only (example: betas=0.9,0.99)."
            ) from None
    if re.fullmatch(r"[+-]?\d+", raw):
        return int(raw)
    try:
        return float(raw)
    except ValueError:
        pass
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """Parse free-form ``"weight_decay=0.01 betas=0.9,0.99 decouple=True"`` into typed keyword arguments.

    Pairs are separated by spaces; spaces around ``=`` and ``,`` are allowed. Values become bool (True/False, any
    case), None, a tuple of floats (comma list), int, float (``1e-3``, ``inf``) or str. Malformed pairs and repeated
    keys raise :class:`TrainerError` naming the pair.
    """
    normalized = re.sub(r"\s*([=,])\s*", r"\1", text.strip())
    args: dict[str, Any] = {}
    for token in normalized.split():
        key, sep, raw = token.partition("=")
        if not sep or not key.isidentifier() or not raw:
            raise TrainerError(
                f"Optimizer args: {token!r} is not a key=value pair (example: weight_decay=0.01 betas=0.9,0.99)."
            )
        if key in args:
            raise TrainerError(f"Optimizer args: {key!r} is given twice; keep one.")
        args[key] = _parse_value(key, raw)
    return args


def _type_problem(key: str, default: Any, value: Any) -> str | None:
    """A message when ``value`` cannot stand in for the constructor default ``default`` (None: accepted)."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"{key} expects True or False, not {value!r}"
    if isinstance(default, tuple):
        if isinstance(value, tuple) and len(value) == len(default):
            return None
        example = ",".join(str(v) for v in default)
        return f"{key} expects {len(default)} comma-separated numbers (e.g. {key}={example}), not {value!r}"
    if isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"{key} expects a number, not {value!r}"
    return None


def validate_optimizer_args(name: str, args: dict[str, Any]) -> None:
    """Check ``args`` against the optimizer class's ``__init__`` signature (names, and types where the default tells).

    Raises :class:`TrainerError` listing every unknown key (with the accepted ones) and every mistyped value.
    Needs the optimizer's library (imported here).
    """
    spec = get_optimizer_spec(name)
    params = list(inspect.signature(spec.load_class().__init__).parameters.values())[1:]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    known = {p.name: p.default for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}
    accepted = [k for k in known if k not in _RESERVED]
    problems = [f"{key} cannot be set here: {why}" for key, why in _RESERVED.items() if key in args]
    unknown = [key for key in args if key not in known and key not in _RESERVED]
    if unknown and not takes_any:
        problems.append(f"unknown argument(s) {', '.join(unknown)}; {spec.name} accepts: {', '.join(accepted)}")
    for key, value in args.items():
        if key in accepted:
            problem = _type_problem(key, known[key], value)
            if problem:
                problems.append(problem)
    if problems:
        raise TrainerError(f"Optimizer args for {spec.name}:\n" + "\n".join(f"  - {p}" for p in problems))


def adaptive_lr_warning(name: str, lrs: Iterable[float]) -> str | None:
    """For DAdaptation/Prodigy, a hint when a learning rate is below 0.1 (their lr multiplies the estimated step)."""
    spec = get_optimizer_spec(name)
    low = [lr for lr in lrs if lr < 0.1]
    if not spec.adaptive or not low:
        return None
    return (
        f"{spec.name} estimates its own step size and expects a learning rate near 1.0; {min(low):g} will make "
        "training very slow. Set the learning rate to 1.0 (the schedule still applies)."
    )


def build_optimizer(
    name: str, param_groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor], lr: float, args: dict[str, Any],
    *, fused: bool = False,
) -> torch.optim.Optimizer:
    """Construct optimizer ``name`` over ``param_groups`` with base ``lr`` and user ``args`` (over the defaults).

    ``fused``: torch's fused kernel (``fused=True``, the ``optim.fused`` speed switch), for an optimizer that takes
    it (AdamW) unless ``args`` set ``fused`` or ``foreach`` themselves. Missing libraries, bad args and constructor
    refusals (e.g. Adafactor's "Cannot combine manual `lr` and `relative_step=True`") raise :class:`TrainerError`.
    A low lr for an adaptive optimizer is logged as a warning.
    """
    spec = get_optimizer_spec(name)
    cls = spec.load_class()
    validate_optimizer_args(spec.name, args)
    groups = list(param_groups)
    group_lrs = [g["lr"] for g in groups if isinstance(g, dict) and "lr" in g]
    warning = adaptive_lr_warning(spec.name, [lr, *group_lrs])
    if warning:
        log.warning(warning)
    if fused and not {"fused", "foreach"} & set(args) and "fused" in inspect.signature(cls.__init__).parameters:
        args = {**args, "fused": True}
    try:
        return cls(groups, lr=lr, **{**spec.defaults, **args})
    except (TypeError, ValueError) as err:
        raise TrainerError(f"Optimizer {spec.name} rejected its settings: {err}") from err


def probe_optimizer(
    name: str, args: dict[str, Any], device: torch.device | str, dtype: torch.dtype = torch.float32
) -> str | None:
    """Run one forward/backward/step of optimizer ``name`` on a 64×128 parameter on ``device``.

    Returns None when the step works and leaves finite values, else a one-line reason (the library's own error).
    Unknown names still raise :class:`TrainerError` (that is a settings mistake, not a capability).
    """
    spec = get_optimizer_spec(name)
    device = torch.device(device)
    try:
        values = torch.linspace(-1.0, 1.0, math.prod(_PROBE_SHAPE), device=device, dtype=dtype)
        weight = torch.nn.Parameter(values.view(_PROBE_SHAPE))
        optimizer = build_optimizer(spec.name, [{"params": [weight]}], 1.0 if spec.adaptive else 1e-3, args)
        (weight.float() - 0.5).pow(2).mean().backward()
        optimizer.step()
        if not bool(torch.isfinite(weight).all()):
            return f"{spec.name} produced non-finite values in a one-step test on {device}."
    except TrainerError as err:
        return str(err)
    except Exception as err:  # the probe exists to turn any library failure into a message
        return f"{spec.name} cannot run on {device} ({dtype}): {type(err).__name__}: {err}"
    return None


def resolve_optimizer(
    name: str,
    args: dict[str, Any],
    device: torch.device | str,
    allow_fallback: bool,
    dtype: torch.dtype = torch.float32,
) -> tuple[str, str | None]:
    """Probe ``name`` and return ``(name_to_use, note)``.

    Works → ``(registered name, None)``. Fails and ``allow_fallback`` → ``("AdamW", note)``, where the note says why;
    the caller then builds AdamW without ``args`` (they belong to the requested optimizer). Fails otherwise (or when
    AdamW itself fails) → raises :class:`TrainerError` with the probe's reason.
    """
    spec = get_optimizer_spec(name)
    reason = probe_optimizer(spec.name, args, device, dtype)
    if reason is None:
        return spec.name, None
    if allow_fallback and spec.name != FALLBACK:
        return FALLBACK, f"{reason}\nUsing {FALLBACK} instead (with its default arguments)."
    raise TrainerError(f"{reason}\nChoose another optimizer, or allow the fallback to {FALLBACK}.")

