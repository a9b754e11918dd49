"""Multi-head self-attention that can be differentiated in forward mode (``torch.func.jvp``).

The normal forward calls ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), which picks
a fused kernel (flash / memory-efficient / CPU flash). Those kernels have no forward-mode AD rule:
``torch.func.jvp`` through them raises ``NotImplementedError`` (checked on torch 2.15, CPU).
Objectives that take a JVP of the network therefore enter ``jvp_attention()``::

    with jvp_attention():
        u, dudt = torch.func.jvp(lambda z, t, h: net(z, t, h, y), (z, t, h), (v, ones, ones))

Inside it, attention is computed as softmax(q·kᵀ/√d)·v from elementary ops (matmul, softmax),
which support both forward-mode AD (the JVP) and ordinary backward through the primal output.
Outside it, the fused kernels are used. Both paths compute the same function.

``jvp_attention(kernel="sdpa_math")`` instead keeps calling SDPA but restricts it to its MATH
backend (``torch.nn.attention.sdpa_kernel``), which also supports forward AD on torch 2.15.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["jvp_attention", "attention", "Attention", "JVP_KERNELS"]

JVP_KERNELS = ("explicit", "sdpa_math")

# None: fused SDPA (default). Otherwise one of JVP_KERNELS.
_JVP_KERNEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("onestep_jvp_attention", default=None)


@contextlib.contextmanager
def jvp_attention(kernel: str = "explicit") -> Iterator[None]:
    """Make attention inside this block support forward-mode AD (enter around ``torch.func.jvp``).

    ``kernel="explicit"`` (default): softmax(q·kᵀ/√d)·v written out with matmuls.
    ``kernel="sdpa_math"``: SDPA restricted to its MATH backend.
    Both also support ordinary backward; both materialize the (N, N) attention matrix.
    """
    if kernel not in JVP_KERNELS:
        raise ValueError(f"unknown jvp attention kernel '{kernel}'; allowed: {', '.join(JVP_KERNELS)}")
    token = _JVP_KERNEL.set(kernel)
    try:
        if kernel == "sdpa_math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            yield
    finally:
        _JVP_KERNEL.reset(token)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    weights = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention. q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim).

    ``dropout_p`` is applied to the attention weights (pass 0 in eval mode).
    """
    kernel = _JVP_KERNEL.get()
    if kernel == "explicit":
        return _explicit_attention(q, k, v, dropout_p)
    try:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    except NotImplementedError as exc:
        if "forward AD" in str(exc):
            raise NotImplementedError(
                "fused scaled_dot_product_attention has no forward-mode AD; wrap torch.func.jvp calls "
                "in `with onestep.backbones.attention.jvp_attention():`"
            ) from exc
        raise


class Attention(nn.Module):
    """Multi-head self-attention over tokens: (B, N, dim) -> (B, N, dim).

    qkv projection with bias, attention (see ``attention``), output projection, dropout on the
    attention weights (``attn_drop``) and on the output (``proj_drop``).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} must be divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))
