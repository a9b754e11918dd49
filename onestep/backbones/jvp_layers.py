"""Linear and convolution layers with their own forward-mode rule, for ``torch.func.jvp`` through a net.

``torch.func.jvp`` differentiates with respect to its inputs only, but it lifts every tensor an op
meets to its level, and the built-in rules of ``addmm`` / ``convolution`` then receive the weight's
and bias's tangents as *materialized zeros* and multiply by them: the tangent of y = x·Wᵀ + b costs
dx·Wᵀ + x·0ᵀ + 0 — two matmuls and two additions where one matmul is the answer, so a JVP through a
net costs well over one primal plus one tangent pass (figures: docs/benchmarks.md, "MeanFlow's
training step against flow matching").

``LinearWithJVP`` / ``Conv2dWithJVP`` are ``torch.autograd.Function``s whose ``jvp`` skips tangents
that are absent (``set_materialize_grads(False)``: an input without a tangent arrives as ``None``, not
zeros), and whose ``backward`` is the usual one (two matmuls / ``convolution_backward``), so the
primal keeps exact gradients. ``jvp_layer_rules()`` routes every ``F.linear`` / ``F.conv2d`` call in
its block through them (a ``TorchFunctionMode``: any backbone, timm's layers included, without
changes); ``jvp_attention("fused")`` enters it. Outside that block nothing changes. The tangents and
gradients equal the built-in ones (tests, float64, with and without weight tangents and autocast).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["LinearWithJVP", "Conv2dWithJVP", "jvp_layer_rules"]

_linear = F.linear
_conv2d = F.conv2d


def _tangent_context(ctx) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if ctx.tangent_grad else torch.no_grad()


def _save(ctx, x, weight, bias, tangent_grad, output) -> None:
    """What both rules keep: x and W for backward and the tangent; absent tangents stay None."""
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight)
    ctx.save_for_forward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype  # None: no bias
    ctx.tangent_grad = tangent_grad
    ctx.out_dtype = output.dtype


def _sum(*terms):
    """The sum of the terms that are present (None: absent); None when none is."""
    out = None
    for term in terms:
        if term is not None:
            out = term if out is None else out + term
    return out


class LinearWithJVP(torch.autograd.Function):
    """y = x·Wᵀ + b with the tangent dx·Wᵀ + x·dWᵀ + db over the tangents that exist."""

    @staticmethod
    def forward(x, weight, bias, tangent_grad):
        return _linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, tangent_grad = inputs
        _save(ctx, x, weight, bias, tangent_grad, output)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        work = grad.dtype  # under autocast the matmul ran in the output's dtype; grads return in the inputs'
        gx = (grad @ weight.to(work)).to(x.dtype) if need_x else None
        g2 = grad.reshape(-1, grad.shape[-1])
        gw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(work)).to(weight.dtype) if need_w else None
        gb = g2.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need_b else None
        return gx, gw, gb, None

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _):
        x, weight = ctx.saved_tensors
        with _tangent_context(ctx):
            out = _sum(
                None if dx is None else _linear(dx, weight), None if dweight is None else _linear(x, dweight), dbias
            )
            if out is None:
                out = x.new_zeros((*x.shape[:-1], weight.shape[0]), dtype=ctx.out_dtype)
            return out.to(ctx.out_dtype)


class Conv2dWithJVP(torch.autograd.Function):
    """y = conv2d(x, W) + b with the tangent conv2d(dx, W) + conv2d(x, dW) + db over the tangents that exist."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups, tangent_grad):
        return _conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, stride, padding, dilation, groups, tangent_grad = inputs
        _save(ctx, x, weight, bias, tangent_grad, output)
        ctx.conv = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 8
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        work = grad.dtype
        # convolution_backward wants explicit per-dimension lists (string padding is resolved here).
        pad = _resolved_padding(padding, weight, dilation)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad,
            x.to(work),
            weight.to(work),
            [weight.shape[0]] if ctx.bias_dtype is not None else None,
            _pair(stride),
            pad,
            _pair(dilation),
            False,
            [0, 0],
            groups,
            [bool(need_x), bool(need_w), bool(ctx.bias_dtype is not None and need_b)],
        )
        return (
            None if gx is None else gx.to(x.dtype),
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(ctx.bias_dtype),
            None,
            None,
            None,
            None,
            None,
        )

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        with _tangent_context(ctx):
            out = _sum(
                None if dx is None else _conv2d(dx, weight, None, stride, padding, dilation, groups),
                None if dweight is None else _conv2d(x, dweight, None, stride, padding, dilation, groups),
                None if dbias is None else dbias.view(1, -1, 1, 1),
            )
            if out is None:
                out = torch.zeros_like(_conv2d(x, weight, None, stride, padding, dilation, groups), dtype=ctx.out_dtype)
            return out.to(ctx.out_dtype)


def _pair(value) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def _resolved_padding(padding, weight, dilation) -> list[int]:
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0]
        # "same" with stride 1 (the only stride F.conv2d allows with it): symmetric where the kernel is odd.
        dil = _pair(dilation)
        total = [d * (k - 1) for d, k in zip(dil, weight.shape[2:])]
        if any(t % 2 for t in total):
            raise NotImplementedError("padding='same' with an even effective kernel has no symmetric padding")
        return [t // 2 for t in total]
    return _pair(padding)


class _LayerRules(TorchFunctionMode):
    def __init__(self, tangent_grad: bool):
        super().__init__()
        self.tangent_grad = tangent_grad

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _linear:
            x, weight, bias = _bind(args, kwargs, ("input", "weight", "bias"), (None,))
            return LinearWithJVP.apply(x, weight, bias, self.tangent_grad)
        if func is _conv2d:
            x, weight, bias, stride, padding, dilation, groups = _bind(
                args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1)
            )
            return Conv2dWithJVP.apply(x, weight, bias, stride, padding, dilation, groups, self.tangent_grad)
        return func(*args, **kwargs)


def _bind(args, kwargs, names, defaults) -> list:
    """Positional + keyword arguments of F.linear / F.conv2d in order, defaults for the tail."""
    out = list(args)
    first_default = len(names) - len(defaults)
    for i in range(len(out), len(names)):
        name = names[i]
        out.append(kwargs[name] if name in kwargs else defaults[i - first_default])
    return out


@contextlib.contextmanager
def jvp_layer_rules(tangent_grad: bool = True) -> Iterator[None]:
    """Inside this block, ``F.linear`` and ``F.conv2d`` (so ``nn.Linear``, ``nn.Conv2d``) use the rules
    above. ``tangent_grad=False``: tangents are computed without an autograd graph (for a JVP output
    that is detached, as MeanFlow's du/dt); gradients through the primal are unaffected."""
    with _LayerRules(bool(tangent_grad)):
        yield
