"""Multi-head self-attention that can be differentiated in forward mode (``torch.func.jvp``).

The normal forward calls ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), which picks
a fused kernel (flash / memory-efficient / CPU flash). Those kernels have no forward-mode AD rule:
``torch.func.jvp`` through them raises ``NotImplementedError`` (checked on torch 2.15, CPU).
Objectives that take a JVP of the network therefore enter ``jvp_attention()``::

    with jvp_attention():
        u, dudt = torch.func.jvp(lambda z, t, h: net(z, t, h, y), (z, t, h), (v, ones, ones))

Kernels inside it (``JVP_KERNELS``):

- ``"fused"`` (default): attention with its own forward-mode rule (``SDPAWithJVP``). The primal
  runs through SDPA's fused kernel; the tangent of O = softmax(S)·V, S = s·q·kᵀ, s = 1/√d, is

      dS = s·(dq·kᵀ + q·dkᵀ),   dO = P·dV + (P ⊙ dS)·V − rowsum(P ⊙ dS) ⊙ O,

  a few extra matmuls on P = softmax(S), which is formed only transiently (chunked over batch ×
  heads) and, with ``tangent_grad=False``, never kept for backward. Backward through the primal
  output recomputes the fused SDPA (no attention matrix is stored). With ``tangent_grad=True``
  (default) the tangent is itself differentiable (exact, tested); MeanFlow detaches du/dt and
  passes False to save the memory of that graph.
  The same kernel also gives linear and convolution layers their own forward-mode rule
  (``onestep.backbones.jvp_layers``: torch's built-in rule multiplies by the weights' zero tangents).
- ``"explicit"``: softmax(q·kᵀ/√d)·v written out with matmuls (forward AD and backward through
  the elementary ops, torch's own rules for every layer; the plain baseline that ``tools/bench.py``
  measures).
- ``"sdpa_math"``: SDPA restricted to its MATH backend (``torch.nn.attention.sdpa_kernel``),
  which also supports forward AD on torch 2.15; half-precision q, k, v run it in fp32 (as the
  backend itself does on CUDA), cast back.

Outside it, the fused kernels are used. All paths compute the same function (tests compare
primal, tangent and gradients in float64). Attention dropout > 0 inside the block falls back to
``"explicit"`` (the fused rule would need the dropout mask).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from onestep.backbones.jvp_layers import jvp_layer_rules

__all__ = ["jvp_attention", "attention", "Attention", "SDPAWithJVP", "JVP_KERNELS"]

JVP_KERNELS = ("fused", "explicit", "sdpa_math")

# None: fused SDPA (default). Otherwise one of JVP_KERNELS.
_JVP_KERNEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("onestep_jvp_attention", default=None)
# Whether the "fused" rule's tangent keeps an autograd graph.
_TANGENT_GRAD: contextvars.ContextVar[bool] = contextvars.ContextVar("onestep_jvp_tangent_grad", default=True)
# Largest number of attention-matrix elements the "fused" rule forms at once (2^26 = 256 MB fp32).
TANGENT_CHUNK_ELEMENTS = 1 << 26


_DECOMPOSITIONS_LOADED = False


def _load_forward_ad_decompositions() -> None:
    """torch loads its forward-AD decompositions at a process's first dual tensor, and that import
    calls ``torch.jit.script``, deprecated since torch 2.10: a FutureWarning from torch's own code on
    every JVP objective's first step. Make that first dual tensor here, once, with only that warning
    silenced (public API: ``forward_ad.make_dual``), so no global filter is needed."""
    global _DECOMPOSITIONS_LOADED
    if _DECOMPOSITIONS_LOADED:
        return
    import torch.autograd.forward_ad as fwAD

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        with fwAD.dual_level():
            fwAD.make_dual(torch.zeros(()), torch.zeros(()))
    _DECOMPOSITIONS_LOADED = True


@contextlib.contextmanager
def jvp_attention(kernel: str = "fused", *, tangent_grad: bool = True) -> Iterator[None]:
    """Make attention inside this block support forward-mode AD (enter around ``torch.func.jvp``).

    ``kernel``: one of ``JVP_KERNELS`` (module docstring). ``tangent_grad=False`` lets the "fused"
    rule compute tangents without an autograd graph (use it when the JVP output is detached, as
    MeanFlow's target is); gradients through the primal are unaffected.
    """
    if kernel not in JVP_KERNELS:
        raise ValueError(f"unknown jvp attention kernel '{kernel}'; allowed: {', '.join(JVP_KERNELS)}")
    _load_forward_ad_decompositions()
    token = _JVP_KERNEL.set(kernel)
    grad_token = _TANGENT_GRAD.set(bool(tangent_grad))
    try:
        if kernel == "sdpa_math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                yield
        elif kernel == "fused":
            with jvp_layer_rules(tangent_grad):
                yield
        else:
            yield
    finally:
        _TANGENT_GRAD.reset(grad_token)
        _JVP_KERNEL.reset(token)


class SDPAWithJVP(torch.autograd.Function):
    """SDPA (fused kernel) with a forward-mode rule and a recomputing backward.

    q, k, v: (B, heads, N, d) -> (B, heads, N, d). Works under ``torch.func.jvp`` and ordinary
    autograd; the tangent formula is in the module docstring.
    """

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v = inputs
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v, output)
        ctx.tangent_grad = _TANGENT_GRAD.get()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [a.detach().requires_grad_(need) for a, need in zip((q, k, v), ctx.needs_input_grad)]
            out = F.scaled_dot_product_attention(*inputs)
            wanted = [a for a in inputs if a.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
        return tuple(next(grads) if need else None for need in ctx.needs_input_grad)

    @staticmethod
    def jvp(ctx, dq, dk, dv):
        q, k, v, out = ctx.saved_tensors
        grad = contextlib.nullcontext() if ctx.tangent_grad else torch.no_grad()
        with grad:
            return _attention_tangent(q, k, v, out, dq, dk, dv)


def _attention_tangent(q, k, v, out, dq, dk, dv) -> torch.Tensor:
    """dO for O = softmax(s·q·kᵀ)·v along (dq, dk, dv) (None = zero), chunked over batch × heads."""
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[-2]
    work = torch.promote_types(q.dtype, torch.float32)  # softmax and sums in >= fp32
    scale = dim**-0.5
    flat = lambda a: None if a is None else a.reshape(batch * heads, *a.shape[2:])  # noqa: E731
    q_, k_, v_, o_, dq_, dk_, dv_ = map(flat, (q, k, v, out, dq, dk, dv))
    chunk = max(1, TANGENT_CHUNK_ELEMENTS // max(1, n_q * n_k))
    pieces = []
    for start in range(0, batch * heads, chunk):
        sl = slice(start, start + chunk)
        # The scale goes on the (n, d) operands, not on the (n, n) products; dS = [s·dq, s·q]·[k, dk]ᵀ
        # is one matmul over the concatenated head dimension.
        qc, kc, vc = q_[sl].to(work) * scale, k_[sl].to(work), v_[sl].to(work)
        p = torch.softmax(qc @ kc.transpose(-1, -2), dim=-1)
        tangent = torch.zeros_like(vc) if dv_ is None else p @ dv_[sl].to(work)
        left, right = [], []
        if dq_ is not None:
            left.append(dq_[sl].to(work) * scale)
            right.append(kc)
        if dk_ is not None:
            left.append(qc)
            right.append(dk_[sl].to(work))
        if left:
            ds = (
                torch.cat(left, -1) @ torch.cat(right, -1).transpose(-1, -2)
                if len(left) > 1
                else left[0] @ right[0].transpose(-1, -2)
            )
            pds = p * ds
            tangent = tangent + pds @ vc - pds.sum(-1, keepdim=True) * o_[sl].to(work)
        pieces.append(tangent.to(out.dtype))
    return torch.cat(pieces).reshape(out.shape)


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
    if kernel == "fused" and dropout_p == 0.0:
        return SDPAWithJVP.apply(q, k, v)
    if kernel in ("fused", "explicit"):
        return _explicit_attention(q, k, v, dropout_p)
    if kernel == "sdpa_math" and q.dtype in (torch.float16, torch.bfloat16):
        # On CUDA the MATH backend upcasts half inputs to fp32 itself, and its forward-AD rule then
        # mixes dtypes ("expected input and grad types to match", torch 2.11, H200). Doing that upcast
        # here, outside autocast, gives the same numbers and a consistent JVP on every device.
        with torch.autocast(q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p)
        return out.to(q.dtype)
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
