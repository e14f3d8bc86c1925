"""kohya-compatible LoRA network injected into the WebUI's live SD1/SD2/SDXL modules (FORMATS.md §A, §E.7).

Three layers:

- :class:`LoRAPair` — one kohya LoRA (``lora_down``, ``lora_up``, ``alpha``): the parameters behind one key stem.
- ``_LinearConvAdapter`` / ``_MultiheadAttentionAdapter`` — plain objects (not ``nn.Module``) that patch one host
  module's *instance* ``forward`` and undo it. They keep the host in a plain list, so the LoRA parameters never
  become submodules of the host: the host's ``state_dict()``/``parameters()`` are unchanged while a LoRA is applied.
- :class:`LoRANetwork` — all pairs of one model in an ``nn.ModuleDict`` keyed by stem, plus apply/restore, optimizer
  groups and kohya state-dict export/import.

Math (§0.3, §A.1): ``scale = alpha / rank`` (alpha 0/None ⇒ alpha = rank);
``ΔW = multiplier · scale · (up.flatten(1) @ down.flatten(1)).reshape(W.shape)``; the forward of a Linear/Conv2d
target is ``org_forward(x) + multiplier · scale · up(dropout(down(x)))``, computed in the LoRA's dtype (fp32) and cast
back to the host output's dtype; where both dtypes agree the scale and the sum run inside the up projection's kernel
(:meth:`LoRAPair.add_to`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainerError
from ..models.families import FAMILIES, Family, TextEncoder, labels_text
from .naming import UNET_PREFIX, encoder_key_stems, unet_stem, unet_stem_is_locon

_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


def _layer(layer: nn.Linear | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Bias-free ``layer(x)`` without calling ``layer.forward``."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight)
    return F.conv2d(x, layer.weight, None, layer.stride, layer.padding, layer.dilation)


class LoRAPair(nn.Module):
    """One kohya LoRA module (FORMATS §A.1).

    ``lora_down``: ``Linear(in, r)`` (weight [r, in]) or ``Conv2d(in, r)`` with the target's kernel, stride, padding
    and dilation (weight [r, in, kh, kw]); ``lora_up``: ``Linear(r, out)`` ([out, r]) or 1×1 ``Conv2d(r, out)``
    ([out, r, 1, 1]); no biases. Init as kohya: down ~ kaiming_uniform(a=√5), up = 0, so ΔW starts at exactly 0.
    ``alpha`` is a float (0 or None ⇒ rank). ``dropout`` drops the rank-``r`` activations between down and up
    (kohya ``network_dropout``) while this module is in training mode. ``multiplier`` scales the whole branch.
    """

    def __init__(self, down: nn.Linear | nn.Conv2d, up: nn.Linear | nn.Conv2d, alpha: float | None,
                 dropout: float = 0.0):
        super().__init__()
        self.lora_down = down
        self.lora_up = up
        self.alpha = float(alpha) if alpha else float(self.rank)
        self.dropout = float(dropout)
        self.multiplier = 1.0
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @classmethod
    def for_linear(cls, in_features: int, out_features: int, rank: int, alpha: float | None, dropout: float,
                   device: torch.device) -> LoRAPair:
        """Pair for a Linear ``[out_features, in_features]`` weight; parameters fp32 on ``device``."""
        kw = dict(bias=False, device=device, dtype=torch.float32)
        return cls(nn.Linear(in_features, rank, **kw), nn.Linear(rank, out_features, **kw), alpha, dropout)

    @classmethod
    def for_conv(cls, conv: nn.Conv2d, rank: int, alpha: float | None, dropout: float) -> LoRAPair:
        """Pair for a Conv2d target: down copies its geometry, up is 1×1; parameters fp32 on the conv's device."""
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise TrainerError(f"cannot put a LoRA on a grouped or non-zero-padded convolution ({conv}); "
                               "this model is not supported")
        kw = dict(bias=False, device=conv.weight.device, dtype=torch.float32)
        down = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                         dilation=conv.dilation, **kw)
        return cls(down, nn.Conv2d(rank, conv.out_channels, 1, **kw), alpha, dropout)

    @property
    def rank(self) -> int:
        return self.lora_down.weight.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank (FORMATS §A.1)."""
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch ``multiplier · scale · up(dropout(down(x)))`` in the pair's dtype.

        down/up run through ``F.linear``/``F.conv2d``, not their modules' ``forward``: the WebUI patches
        ``nn.Linear.forward``/``nn.Conv2d.forward`` class-wide, and those patches must not see our own layers.
        """
        return _layer(self.lora_up, self._down(x)) * (self.multiplier * self.scale)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """The rank-``r`` activations ``dropout(down(x))``, in the pair's dtype."""
        h = _layer(self.lora_down, x.to(self.lora_down.weight.dtype))
        return F.dropout(h, p=self.dropout) if self.dropout > 0 and self.training else h

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + forward(x)``, the host's output plus the branch, with fewer full-size operations.

        When ``out`` has the branch's dtype the scale and the sum go into the up projection's own kernel: one
        ``addmm`` for a Linear (``out + s·h·upᵀ``), ``add(..., alpha=s)`` for a Conv2d. That saves a full-size
        multiply and its backward per layer and step (the same sum; the last bit may round differently). Otherwise
        (a 16-bit host under a fp32 branch) the branch is computed as :meth:`forward` does and cast to ``out``'s dtype.
        """
        h = self._down(x)
        s = self.multiplier * self.scale
        if out.dtype != h.dtype:
            return out + (_layer(self.lora_up, h) * s).to(out.dtype)
        if isinstance(self.lora_up, nn.Linear):
            n = out.shape[-1]
            return torch.addmm(out.reshape(-1, n), h.reshape(-1, h.shape[-1]), self.lora_up.weight.t(),
                               alpha=s).view(out.shape)
        return out.add(_layer(self.lora_up, h), alpha=s)

    def delta_weight(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """ΔW = multiplier · scale · (up.flatten(1) @ down.flatten(1)), reshaped to the target weight ``shape``."""
        w = self.lora_up.weight.flatten(1) @ self.lora_down.weight.flatten(1)
        return w.reshape(shape) * (self.multiplier * self.scale)


class _ForwardPatch:
    """Replace ``host.forward`` on the instance and put back exactly what was there.

    The bound ``forward`` seen at apply time (the class method, possibly patched class-wide by the WebUI, or an
    instance override) is what the wrapper calls. If the instance had no ``forward`` in its ``__dict__`` before,
    it has none after :meth:`restore`.
    """

    def __init__(self, host: nn.Module):
        self._host = [host]  # plain list: never a registered submodule
        self._saved: tuple[bool, object] | None = None

    @property
    def host(self) -> nn.Module:
        return self._host[0]

    @property
    def applied(self) -> bool:
        return self._saved is not None

    def apply(self, make_forward: Callable[[Callable], Callable]) -> None:
        if self.applied:
            return
        host = self.host
        had_own = "forward" in host.__dict__
        self._saved = (had_own, host.__dict__.get("forward"))
        host.forward = make_forward(host.forward)

    def restore(self) -> None:
        if not self.applied:
            return
        had_own, previous = self._saved
        if had_own:
            self.host.forward = previous
        else:
            self.host.__dict__.pop("forward", None)
        self._saved = None


class _LinearConvAdapter:
    """One Linear or Conv2d host with one :class:`LoRAPair`: ``forward(x) = org(x) + pair(x)`` (host dtype)."""

    def __init__(self, stem: str, host: nn.Linear | nn.Conv2d, pair: LoRAPair):
        self.stems = (stem,)
        self.pairs = (pair,)
        self._patch = _ForwardPatch(host)

    def apply(self) -> None:
        pair = self.pairs[0]

        def make(org: Callable) -> Callable:
            def forward(input: torch.Tensor) -> torch.Tensor:
                return pair.add_to(org(input), input)

            return forward

        self._patch.apply(make)

    def restore(self) -> None:
        self._patch.restore()

    def delta_weight(self, stem: str) -> torch.Tensor:
        return self.pairs[0].delta_weight(self._patch.host.weight.shape)

    def weight_deltas(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        host = self._patch.host
        return [(host.weight, self.pairs[0].delta_weight(host.weight.shape))]


def _seq_first(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """Transpose batch-first inputs to seq-first, keeping ``query is key is value`` identities (they select the
    packed self-attention projection inside ``F.multi_head_attention_forward``)."""
    if key is value:
        if query is key:
            q = query.transpose(1, 0)
            return q, q, q
        q, k = query.transpose(1, 0), key.transpose(1, 0)
        return q, k, k
    return query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)


class _MultiheadAttentionAdapter:
    """open_clip's fused ``nn.MultiheadAttention`` (SD2 text encoder) with four pairs q, k, v, out (FORMATS §A.3.4).

    The forward calls ``F.multi_head_attention_forward`` with ``in_proj_weight + cat(ΔW_q, ΔW_k, ΔW_v)`` and
    ``out_proj.weight + ΔW_o`` and every original argument, exactly as ``nn.MultiheadAttention.forward``'s general
    path does. The sum is formed in fp32 and cast to the host weight dtype (one rounding). The pair dropout does not
    apply here: the LoRA is merged into the weights, so there is no rank activation to drop.
    """

    def __init__(self, stems: list[str], host: nn.MultiheadAttention, pairs: list[LoRAPair]):
        if not host._qkv_same_embed_dim or host.in_proj_weight is None:
            raise TrainerError(f"cannot put a LoRA on an attention layer with separate q/k/v weights ({host}); "
                               "this text encoder is not supported")
        self.stems = tuple(stems)
        self.pairs = tuple(pairs)
        self._patch = _ForwardPatch(host)

    def _deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ΔW_in [3d, d] = rows q, k, v; ΔW_out [d, d]), in the pairs' dtype."""
        d = self._patch.host.embed_dim
        q, k, v, o = (p.delta_weight((d, d)) for p in self.pairs)
        return torch.cat([q, k, v], 0), o

    def apply(self) -> None:
        mha = self._patch.host

        def make(org: Callable) -> Callable:
            # ``org`` is not called: nn.MultiheadAttention.forward reads its weight parameters directly, so the
            # effective weights are passed to the functional form instead (FORMATS §A.3.4).
            def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                        average_attn_weights=True, is_causal=False):
                d_in, d_out = self._deltas()
                w_in = (mha.in_proj_weight.to(d_in.dtype) + d_in).to(mha.in_proj_weight.dtype)
                w_out = (mha.out_proj.weight.to(d_out.dtype) + d_out).to(mha.out_proj.weight.dtype)
                transpose = mha.batch_first and query.dim() == 3
                if transpose:
                    query, key, value = _seq_first(query, key, value)
                out, weights = F.multi_head_attention_forward(
                    query, key, value, mha.embed_dim, mha.num_heads, w_in, mha.in_proj_bias, mha.bias_k,
                    mha.bias_v, mha.add_zero_attn, mha.dropout, w_out, mha.out_proj.bias, training=mha.training,
                    key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                    average_attn_weights=average_attn_weights, is_causal=is_causal)
                return (out.transpose(1, 0) if transpose else out), weights

            return forward

        self._patch.apply(make)

    def restore(self) -> None:
        self._patch.restore()

    def delta_weight(self, stem: str) -> torch.Tensor:
        d = self._patch.host.embed_dim
        return self.pairs[self.stems.index(stem)].delta_weight((d, d))

    def weight_deltas(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        mha = self._patch.host
        d_in, d_out = self._deltas()
        return [(mha.in_proj_weight, d_in), (mha.out_proj.weight, d_out)]


_Adapter = _LinearConvAdapter | _MultiheadAttentionAdapter


def _check_rank(value: int | None, what: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainerError(f"the LoRA {what} must be a whole number of at least 1, got {value!r}")


def _check_alpha(value: float | None, what: str) -> None:
    if value is not None and not value >= 0:
        raise TrainerError(f"the LoRA {what} must be 0 or more (0 means 'same as the rank'), got {value!r}")


def _unet_adapters(unet: nn.Module, family: Family, rank: int, alpha: float | None, conv_rank: int | None,
                   conv_alpha: float | None, dropout: float) -> list[_Adapter]:
    """kohya's default UNet targets (FORMATS §A.2): SpatialTransformer Linear/Conv2d children, plus with ``conv_rank``
    the ResBlock/Downsample/Upsample children (3×3 convs get conv rank/alpha, the rest the linear rank/alpha)."""
    adapters: list[_Adapter] = []
    for path, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        stem = unet_stem(family, path)
        if stem is None or (conv_rank is None and unet_stem_is_locon(stem)):
            continue
        if isinstance(module, nn.Linear):
            pair = LoRAPair.for_linear(module.in_features, module.out_features, rank, alpha, dropout,
                                       module.weight.device)
        elif tuple(module.kernel_size) == (1, 1):
            pair = LoRAPair.for_conv(module, rank, alpha, dropout)
        else:
            pair = LoRAPair.for_conv(module, conv_rank, conv_alpha, dropout)
        adapters.append(_LinearConvAdapter(stem, module, pair))
    if not adapters:
        raise TrainerError(f"found no LoRA target modules in the UNet; only {labels_text('/')} (ldm UNetModel) and "
                           "SDXL (sgm UNetModel) are supported")
    return adapters


def _text_encoder_adapters(text_encoder: nn.Module, family: Family, rank: int, alpha: float | None,
                           dropout: float) -> list[_Adapter]:
    """Text-encoder targets (FORMATS §A.2, §A.3.3) of every encoder of ``family``: HF CLIP q/k/v/out + fc1/fc2 (SD1,
    SDXL clip_l); open_clip fused MHA (q/k/v/out) + c_fc/c_proj (SD2: every resblock but the last, 0..22 on the real
    model; SDXL clip_g: all). ``text_encoder`` is the text-encoder root: the ldm embedder (SD1/SD2) or the object
    holding the embedders at the records' paths (SDXL ``conditioner``: ``embedders.0``/``embedders.1``)."""
    adapters: list[_Adapter] = []
    for encoder in family.text_encoders:
        try:
            embedder = encoder.module(text_encoder)
        except AttributeError:
            continue  # reported below as "no target modules"
        adapters += _encoder_adapters(embedder, encoder, family, rank, alpha, dropout)
    if not adapters:
        raise TrainerError(f"found no LoRA target modules in the text encoder; is this an {family.short} model "
                           f"(family {family.name!r})?")
    return adapters


def _encoder_adapters(embedder: nn.Module, encoder: TextEncoder, family: Family, rank: int, alpha: float | None,
                      dropout: float) -> list[_Adapter]:
    """The targets of one text encoder (module paths relative to its embedder)."""
    adapters: list[_Adapter] = []
    num_layers = encoder.kind.num_layers(embedder)
    for path, module in embedder.named_modules():
        stems = encoder_key_stems(encoder, path, num_layers)
        if not stems:
            continue
        if isinstance(module, nn.MultiheadAttention) and len(stems) == 4:
            d, dev = module.embed_dim, module.in_proj_weight.device
            pairs = [LoRAPair.for_linear(d, d, rank, alpha, dropout, dev) for _ in stems]
            adapters.append(_MultiheadAttentionAdapter(stems, module, pairs))
        elif isinstance(module, nn.Linear) and len(stems) == 1:
            pair = LoRAPair.for_linear(module.in_features, module.out_features, rank, alpha, dropout,
                                       module.weight.device)
            adapters.append(_LinearConvAdapter(stems[0], module, pair))
        else:
            raise TrainerError(f"text-encoder module '{path}' is a {type(module).__name__}, not the layer an "
                               f"{family.short} text encoder has there; this model is not supported")
    return adapters


def _export(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """CPU, contiguous, own storage (safetensors rejects shared tensors, FORMATS §A.1)."""
    return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def _matrix_shape(shape: torch.Size) -> tuple[int, ...]:
    """A 1×1 conv weight and a Linear weight are interchangeable in LoRA files (FORMATS §A.1, A.3.1 SD2 proj)."""
    return tuple(shape[:2]) if len(shape) == 4 and tuple(shape[2:]) == (1, 1) else tuple(shape)


def _listing(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class LoRANetwork(nn.Module):
    """All LoRA pairs for one SD1/SD2/SDXL model, keyed by kohya stem; injects and removes them.

    Build with :meth:`for_model`, then ``apply()``/``restore()`` (or ``with network:``). While applied, the host
    modules' ``forward`` include the LoRA; host weights, ``requires_grad``, ``training`` and dtype are never touched.
    ``network.train()/eval()`` switches only the LoRA dropout.
    """

    def __init__(self, adapters: list[_Adapter]):
        super().__init__()
        self.pairs = nn.ModuleDict()
        self._adapters = list(adapters)  # plain list: hosts stay outside this module tree
        self._adapter_of: dict[str, _Adapter] = {}
        for adapter in self._adapters:
            for stem, pair in zip(adapter.stems, adapter.pairs, strict=True):
                if stem in self.pairs:
                    raise TrainerError(f"two modules map to the same LoRA key '{stem}'; this model is not supported")
                self.pairs[stem] = pair
                self._adapter_of[stem] = adapter

    @classmethod
    def for_model(cls, unet: nn.Module | None, text_encoder: nn.Module | None, *, family: str | Family, rank: int,
                  alpha: float | None, conv_rank: int | None = None, conv_alpha: float | None = None,
                  train_unet: bool = True, train_text_encoder: bool = True, dropout: float = 0.0) -> LoRANetwork:
        """kohya's default target set (FORMATS §A.2) on an ldm ``UNetModel`` and/or ldm text embedder.

        ``family``: a trained family's name (:data:`lib_train.models.families.FAMILIES`) or a record (the SDXL record
        works before SDXL is switched on there): SD1's ``text_encoder.transformer`` is an HF ``CLIPTextModel``, SD2's
        ``text_encoder.model`` an open_clip text tower, SDXL's ``text_encoder`` the conditioner holding both
        (``embedders.0``/``embedders.1``); the UNet is ldm's (SD1/SD2) or sgm's (SDXL). ``rank``/``alpha``: Linear
        and 1×1 conv targets;
        ``conv_rank``/``conv_alpha``: set ``conv_rank`` for LoCon (adds ResBlock/Down/Upsample targets; 3×3 convs
        get these). Alpha 0/None ⇒ alpha = its rank. ``text_encoder=None`` or ``train_text_encoder=False`` ⇒ no
        text-encoder LoRA; ``train_unet=False`` ⇒ no UNet LoRA. Raises :class:`TrainerError` for bad settings.
        """
        if isinstance(family, Family):
            fam = family
        elif family in FAMILIES:
            fam = FAMILIES[family]
        else:
            raise TrainerError(f"LoRA training supports {labels_text(' and ')} models here, not '{family}'")
        _check_rank(rank, "rank (network dim)")
        _check_alpha(alpha, "alpha")
        if conv_rank is not None:
            _check_rank(conv_rank, "conv rank (conv dim)")
            _check_alpha(conv_alpha, "conv alpha")
        if not 0.0 <= dropout < 1.0:
            raise TrainerError(f"the LoRA dropout must be at least 0 and below 1, got {dropout!r}")
        adapters: list[_Adapter] = []
        if train_unet and unet is not None:
            adapters += _unet_adapters(unet, fam, rank, alpha, conv_rank, conv_alpha, dropout)
        if train_text_encoder and text_encoder is not None:
            adapters += _text_encoder_adapters(text_encoder, fam, rank, alpha, dropout)
        if not adapters:
            raise TrainerError("nothing to train: the LoRA covers neither the UNet nor the text encoder")
        return cls(adapters)

    # --- injection -------------------------------------------------------------------------------------------

    def apply(self) -> LoRANetwork:
        """Wrap every target's forward (idempotent)."""
        for adapter in self._adapters:
            adapter.apply()
        return self

    def restore(self) -> None:
        """Undo :meth:`apply` exactly; safe to call when not applied."""
        for adapter in reversed(self._adapters):
            adapter.restore()

    def __enter__(self) -> LoRANetwork:
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.restore()

    # --- parameters ------------------------------------------------------------------------------------------

    def stems(self) -> list[str]:
        """kohya key stems, in module order (UNet first)."""
        return list(self.pairs.keys())

    @property
    def multiplier(self) -> float:
        return next(iter(self.pairs.values())).multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        for pair in self.pairs.values():
            pair.multiplier = float(value)

    def _params(self, unet: bool) -> list[nn.Parameter]:
        return [p for stem, pair in self.pairs.items() if stem.startswith(UNET_PREFIX) == unet
                for p in pair.parameters()]

    def unet_parameters(self) -> list[nn.Parameter]:
        return self._params(unet=True)

    def text_encoder_parameters(self) -> list[nn.Parameter]:
        """The parameters of every text encoder's pairs (all stems but the UNet's)."""
        return self._params(unet=False)

    def param_groups(self, unet_lr: float, te_lr: float) -> list[dict]:
        """Optimizer groups ``{"name", "params", "lr"}`` for UNet and text encoder.

        A group whose lr is 0 (or that has no pairs) is left out and its parameters get ``requires_grad=False``, so
        autograd never creates their gradients; the others get ``requires_grad=True``.
        """
        groups = []
        for name, lr, params in (("unet", unet_lr, self.unet_parameters()),
                                 ("text_encoder", te_lr, self.text_encoder_parameters())):
            if lr < 0:
                raise TrainerError(f"the {name.replace('_', ' ')} learning rate must not be negative, got {lr!r}")
            for p in params:
                p.requires_grad_(lr > 0)
            if params and lr > 0:
                groups.append({"name": name, "params": params, "lr": lr})
        if not groups:
            raise TrainerError("nothing to train: every learning rate is 0 for the parts this LoRA covers")
        return groups

    # --- weights ---------------------------------------------------------------------------------------------

    def delta_weight(self, stem: str) -> torch.Tensor:
        """ΔW of one stem, shaped like the weight it changes (for an SD2 q/k/v stem: its [d, d] row block of
        ``in_proj_weight``, rows q=0:d, k=d:2d, v=2d:3d, as A1111 applies it, FORMATS §A.3.3)."""
        if stem not in self._adapter_of:
            raise KeyError(stem)
        return self._adapter_of[stem].delta_weight(stem)

    def weight_deltas(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(host weight, ΔW) for every target, exactly what the applied forward adds (for a fused MHA: the [3d, d]
        ``in_proj_weight`` delta and the ``out_proj.weight`` delta). Adding each ΔW to its weight bakes the LoRA
        in."""
        return [item for adapter in self._adapters for item in adapter.weight_deltas()]

    def kohya_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """``<stem>.lora_down.weight``, ``<stem>.lora_up.weight``, ``<stem>.alpha`` (0-dim) for every stem, cast to
        ``dtype``; CPU, contiguous, no shared storage (FORMATS §0.1, §A.1)."""
        out: dict[str, torch.Tensor] = {}
        for stem, pair in self.pairs.items():
            out[f"{stem}.lora_down.weight"] = _export(pair.lora_down.weight, dtype)
            out[f"{stem}.lora_up.weight"] = _export(pair.lora_up.weight, dtype)
            out[f"{stem}.alpha"] = torch.tensor(pair.alpha, dtype=dtype)
        return out

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "the LoRA file") -> None:
        """Inverse of :meth:`kohya_state_dict`: copy down/up weights and alpha into the pairs.

        A missing ``alpha`` (or alpha 0) means alpha = rank (kohya). A 1×1-conv weight and a Linear weight of the same
        matrix are interchangeable. Nothing is changed unless every stem matches: missing or unexpected stems, unknown
        key parts and shape mismatches raise one :class:`TrainerError` naming them and ``source``.
        """
        found: dict[str, dict[str, torch.Tensor]] = {}
        bad_keys = []
        for key, t in tensors.items():
            stem, _, part = key.partition(".")
            if part in _PARTS:
                found.setdefault(stem, {})[part] = t
            else:
                bad_keys.append(key)
        unexpected = sorted(s for s in found if s not in self.pairs)
        missing = [s for s in self.pairs if "lora_down.weight" not in found.get(s, {})
                   or "lora_up.weight" not in found.get(s, {})]
        mismatched = []
        for stem, pair in self.pairs.items():
            parts = found.get(stem, {})
            for part, param in (("lora_down.weight", pair.lora_down.weight), ("lora_up.weight", pair.lora_up.weight)):
                if part in parts and _matrix_shape(parts[part].shape) != _matrix_shape(param.shape):
                    mismatched.append(f"{stem}.{part} is {list(parts[part].shape)}, expected {list(param.shape)}")
        problems = []
        if bad_keys:
            problems.append(f"keys that are not kohya LoRA weights: {_listing(bad_keys)}")
        if missing:
            problems.append(f"modules missing from the file: {_listing(missing)}")
        if unexpected:
            problems.append(f"modules in the file that this LoRA does not have: {_listing(unexpected)}")
        if mismatched:
            problems.append("shape mismatches (the file was trained with another rank or conv rank; use the file's "
                            f"settings): {_listing(mismatched)}")
        if problems:
            raise TrainerError(f"{source} does not fit this LoRA network (rank, conv rank, text-encoder and LoCon "
                               "settings must match the file):\n  - " + "\n  - ".join(problems))
        with torch.no_grad():
            for stem, pair in self.pairs.items():
                parts = found[stem]
                for part, param in (("lora_down.weight", pair.lora_down.weight),
                                    ("lora_up.weight", pair.lora_up.weight)):
                    param.copy_(parts[part].reshape(param.shape))
                alpha = float(parts["alpha"].item()) if "alpha" in parts else 0.0
                pair.alpha = alpha if alpha else float(pair.rank)
