"""Fused attention for ldm models loaded headless.

ldm's ``CrossAttention`` materialises the full attention matrix in fp32 (even under fp16/bf16 autocast) and keeps it
for backward: about 2.5 GiB at 512² for SD1.5. The WebUI replaces this with its own optimised attention; headless we
install PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels where available) on each
``CrossAttention`` instance. The projections ``to_q``/``to_k``/``to_v``/``to_out`` are called as before, so LoRA on
them works unchanged. ldm's UNet never passes an attention mask, so none is supported here.
:func:`restore_attention` takes it out again.

Inside the WebUI the loaded model runs the WebUI's own optimisation (Settings → Optimizations);
:func:`choose_attention` decides whether ours replaces it for a run (only where ours is faster) and names the one
that runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sdpa_forward(module: torch.nn.Module):
    def forward(x: torch.Tensor, context: torch.Tensor | None = None, mask=None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("the fused attention installed by lib_train does not support masks")
        h = module.heads
        context = x if context is None else context
        q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
        b, n, inner = q.shape
        q, k, v = (t.reshape(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale = 1/sqrt(head dim), as ldm's self.scale
        return module.to_out(out.transpose(1, 2).reshape(b, n, inner))

    forward._lib_train_sdpa = True  # what restore_attention takes out
    return forward


def use_sdpa(model: torch.nn.Module) -> int:
    """Give every ldm ``CrossAttention`` in ``model`` the fused forward; returns how many were changed."""
    count = 0
    for m in model.modules():
        if type(m).__name__ == "CrossAttention" and hasattr(m, "to_q") and hasattr(m, "heads") and not _installed(m):
            forward = _sdpa_forward(m)
            forward._lib_train_before = vars(m).get("forward")  # an instance forward someone else set, if any
            m.forward = forward
            count += 1
    return count


def _installed(m: torch.nn.Module) -> bool:
    return getattr(vars(m).get("forward"), "_lib_train_sdpa", False)


def restore_attention(model: torch.nn.Module) -> int:
    """Undo :func:`use_sdpa`: every ``CrossAttention`` in ``model`` that has the fused forward gets back what it had
    before (an instance forward set by someone else, else its class's, such as the WebUI's optimisation, which the
    WebUI installs on the class); returns how many."""
    count = 0
    for m in model.modules():
        if _installed(m):
            before = m.forward._lib_train_before
            if before is None:
                del m.forward
            else:
                m.forward = before
            count += 1
    return count


# ------------------------------------------------------------------------------------ inside the WebUI: which one

# The WebUI's cross-attention optimisations (modules.sd_hijack_optimizations, ``model_hijack.optimization_method``)
# that run the same fused kernels as ours or faster ones: xformers' memory-efficient kernel, and torch's
# scaled_dot_product_attention itself ("sdp"; "sdp-no-mem" without the memory-efficient kernel, flash/math only).
# The others compute attention in Python-level chunks (Doggettx's split, InvokeAI, sub-quadratic, V1) or not at all
# optimised ("none" / unset): the fused SDPA is faster than each of them.
WEBUI_FAST_ATTENTION = ("xformers", "sdp", "sdp-no-mem")


def choose_attention(webui_method: str | None, *, ldm: bool = True, sdpa_available: bool | None = None
                     ) -> tuple[str, str]:
    """Which attention a run inside the WebUI uses: ``("webui", what)`` to keep the WebUI's optimisation
    ``webui_method`` (``sd_hijack.model_hijack.optimization_method``: "sdp", "xformers", "Doggettx", …; None or ""
    = none), or ``("ours", what)`` to install :func:`use_sdpa` for the run; ``what`` names the one that runs, for
    the job's log and status. ``ldm``: the model's attention is ldm's ``CrossAttention`` (SD1/SD2; SDXL's sgm
    attention takes arguments ours does not, so it keeps the WebUI's)."""
    if sdpa_available is None:
        sdpa_available = hasattr(F, "scaled_dot_product_attention")
    method = (webui_method or "").strip()
    webui = f"the WebUI's {method} attention" if method else "the WebUI's unoptimised attention"
    if method.lower() in WEBUI_FAST_ATTENTION:
        return "webui", webui
    if not ldm:
        return "webui", f"{webui} (SDXL: lib_train installs none on sgm's attention)"
    if not sdpa_available:
        return "webui", f"{webui} (this torch has no fused scaled_dot_product_attention)"
    return "ours", (f"lib_train's fused scaled_dot_product_attention (faster than {webui[len('the '):]}, which the "
                    "WebUI is set to)")
