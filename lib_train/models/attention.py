"""Fused attention for ldm models loaded headless.

ldm's ``CrossAttention`` materialises the full attention matrix in fp32 (even under fp16/bf16 autocast) and keeps it
for backward: about 2.5 GiB at 512² for SD1.5. The WebUI replaces this with its own optimised attention; headless we
install PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels where available) on each
``CrossAttention`` instance. The projections ``to_q``/``to_k``/``to_v``/``to_out`` are called as before, so LoRA on
them works unchanged. ldm's UNet never passes an attention mask, so none is supported here.
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

    return forward


def use_sdpa(model: torch.nn.Module) -> int:
    """Give every ldm ``CrossAttention`` in ``model`` the fused forward; returns how many were changed."""
    count = 0
    for m in model.modules():
        if type(m).__name__ == "CrossAttention" and hasattr(m, "to_q") and hasattr(m, "heads"):
            m.forward = _sdpa_forward(m)
            count += 1
    return count
