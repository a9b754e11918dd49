"""Shared math of the objectives: the noising path, time broadcasting, the adaptive weight, labels
and guidance, the velocity estimates, and value checks. Every objective imports these; none
writes them again.

Notation (all objectives): x data, e ~ N(0, I) noise, t, r times in [0, 1] with r <= t (noise at
t = 1), h = t − r the interval,

    z_t = (1 − t)·x + t·e         (``interpolate``)
    v   = e − x                   (the conditional velocity)

u_θ(z, t, h, y) the network output, y class ids with the null id ``num_classes``.

Velocity estimates (``velocity_estimate``): "conditional" is v = e − x, the papers' target;
"batch_posterior" is the stable-target-field estimate (Xu, Tong & Jaakkola, ICLR 2023) of the
marginal velocity E[v | z_t] with the training batch (all ranks') as reference set,

    v̂_i = Σ_j w_ij (z_i − x_j) / t_i,   w_ij ∝ N(z_i; (1 − t_i) x_j, t_i² I)   (softmax over j),

j over the samples of the same class when sample i keeps its label. Same regression minimizer up to
the reference set's finite size (v̂ → E[v | z_t] as the batch grows; exact at t = 1 and t → 0), much
lower variance where many x_j explain z_i (small data dimension, large t); in high dimension the
weights fall onto j = i and v̂ is v again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from onestep.utils.distributed import all_gather_rows, current

# ----------------------------------------------------------------------------------------------
# Checks (one-line ValueErrors naming the option and what is allowed).


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ValueError naming ``name`` and the allowed interval if ``value`` lies outside it."""
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = (
            f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        )
        raise ValueError(f"{name} must be in {interval}, got {value}")


def check_adaptive(p: float, c: float) -> None:
    check_range("adaptive_p", p, 0.0)
    check_range("adaptive_c", c, 0.0, low_open=True)


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Raise ValueError naming ``name`` and the allowed values if ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


# ----------------------------------------------------------------------------------------------
# Times and the path.


def expand_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a (B,) or scalar time against x of shape (B, ...) -> (B, 1, ..., 1)."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), device=x.device, dtype=x.dtype)
    t = t.to(device=x.device, dtype=x.dtype)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(x.shape[0], *([1] * (x.ndim - 1)))


def batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """A (B,) time tensor on x's device/dtype from a scalar or (B,) input."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t))
    t = t.to(device=x.device, dtype=x.dtype)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def eager_module(net: nn.Module) -> nn.Module:
    """The plain module behind a ``torch.compile`` wrapper (``torch.func`` transforms run on it)."""
    return getattr(net, "_orig_mod", net)


def interpolate(x: Tensor, e: Tensor, t: Tensor | float) -> Tensor:
    """The noised sample z_t = (1 − t)·x + t·e, t (B,) or scalar broadcast against x (B, ...)."""
    t = expand_time(t, x)
    return (1 - t) * x + t * e


# ----------------------------------------------------------------------------------------------
# Losses, labels, guidance, velocities.


def sum_squares(diff: Tensor) -> Tensor:
    """(B, ...) -> (B,) sum of squares over all non-batch elements, in float32 or wider."""
    diff = diff.float() if diff.dtype in (torch.float16, torch.bfloat16) else diff
    return diff.square().flatten(1).sum(1)


def adaptive_weight(l: Tensor, p: float, c: float) -> Tensor:
    """The adaptive loss weight w = 1 / sg((l + c)^p), (B,) -> (B,); the weighted loss is w · l.

    l is the per-sample sum of squares (divided once, not squared again). p = 0 gives w = 1.
    """
    check_adaptive(p, c)
    if p == 0:
        return torch.ones_like(l)
    return 1.0 / (l.detach() + c).pow(p)


def num_classes_of(net: nn.Module) -> int:
    """``net.num_classes`` (0 = unconditional), looking through wrappers with a ``.module``."""
    while not hasattr(net, "num_classes") and hasattr(net, "module"):
        net = net.module
    return int(getattr(net, "num_classes", 0) or 0)


def drop_labels(
    y: Tensor | None, num_classes: int, class_dropout: float, generator: torch.Generator | None = None
) -> Tensor | None:
    """Replace each label by the null id ``num_classes`` with probability ``class_dropout``.

    Unconditional (num_classes = 0), no labels, or class_dropout = 0: returned unchanged.
    """
    if y is None or num_classes <= 0 or class_dropout <= 0:
        return y
    dropped = torch.rand(y.shape, generator=generator, device=y.device) < class_dropout
    return torch.where(dropped, torch.full_like(y, num_classes), y)


def cfg_velocity(v: Tensor, u_cond: Tensor, u_uncond: Tensor, omega: float, kappa: float) -> Tensor:
    """MeanFlow's training-time guided velocity ṽ = ω·v + κ·u(c) + (1 − ω − κ)·u(∅).

    Its effective guidance scale is ω / (1 − κ).
    """
    return omega * v + kappa * u_cond + (1.0 - omega - kappa) * u_uncond


def check_guidance_interval(name: str, interval: Any) -> tuple[float, float] | None:
    """None, or ``[lo, hi]`` with 0 <= lo <= hi <= 1 as a tuple (ValueError naming ``name`` otherwise)."""
    if interval is None:
        return None
    if not isinstance(interval, (list, tuple)) or len(interval) != 2:
        raise ValueError(f"{name} must be [lo, hi] (times in [0, 1]) or null, got {interval!r}")
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name} must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(interval)}")
    return lo, hi


def guided_output(
    net: nn.Module,
    x: Tensor,
    t: Tensor,
    h: Tensor,
    y: Tensor | None,
    guidance_scale: float = 1.0,
    interval: tuple[float, float] | None = None,
) -> Tensor:
    """net(x, t, h, y) with classifier-free guidance out(∅) + w·(out(c) − out(∅)).

    One batched call for cond + uncond; plain call when w = 1, no labels or unconditional net.
    ``interval`` = (lo, hi): guidance only for samples with lo <= t <= hi, out(c) elsewhere (REPA's
    sampler: guidance_low <= t <= guidance_high, in the same t, t = 1 noise).
    """
    num_classes = num_classes_of(net)
    if num_classes == 0:
        y = None
    if guidance_scale == 1.0 or y is None:
        return net(x, t, h, y)
    null = torch.full_like(y, num_classes)
    out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([h, h]), torch.cat([y, null]))
    cond, uncond = out.chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    if interval is None:
        return guided
    inside = (t >= interval[0]) & (t <= interval[1])
    return torch.where(inside.reshape(-1, *([1] * (x.ndim - 1))), guided, cond)


VELOCITY_ESTIMATES = ("conditional", "batch_posterior")


def check_velocity_estimate(name: str) -> None:
    if name not in VELOCITY_ESTIMATES:
        raise ValueError(f"velocity_estimate must be one of {', '.join(map(repr, VELOCITY_ESTIMATES))}; got {name!r}")


@torch.no_grad()
def batch_posterior_velocity(
    x: Tensor,
    e: Tensor,
    t: Tensor,
    labels: Tensor | None = None,
    query_labels: Tensor | None = None,
    null_class: int | None = None,
    *,
    reference: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """The batch's estimate of E[v | z_t] at z_i = (1 − t_i) x_i + t_i e_i (module docstring), like x.

    The reference set is ``reference`` (N, ...) whose rows ``offset .. offset + B`` are x itself (the
    global batch under DDP), default x. ``labels`` (N,) are the reference samples' classes and
    ``query_labels`` (B,) the classes each z_i is conditioned on (``null_class`` = unconditional: every
    j counts); sample i's own x_i is always in its reference set. Computed in float64 as
    (e_i − x_i) + (x_i − Σ_j w_ij x_j) / t_i, which is e_i − x_i exactly where t_i = 0.
    """
    if x.shape != e.shape or t.shape != x.shape[:1]:
        raise ValueError(
            f"batch_posterior_velocity: x, e must share a shape and t be (B,); got "
            f"{tuple(x.shape)}, {tuple(e.shape)}, {tuple(t.shape)}"
        )
    xf, ef, tt = x.flatten(1).double(), e.flatten(1).double(), t.double().to(x.device)
    ref = xf if reference is None else reference.flatten(1).double()
    if ref.shape[1] != xf.shape[1] or not 0 <= offset <= ref.shape[0] - xf.shape[0]:
        raise ValueError(
            f"batch_posterior_velocity: reference {tuple(ref.shape)} must hold x {tuple(xf.shape)} "
            f"at rows {offset}..{offset + xf.shape[0]}"
        )
    a = 1.0 - tt
    z = a[:, None] * xf + tt[:, None] * ef
    t_safe = tt.clamp_min(1e-12)
    # log N(z_i; a_i x_j, t_i² I) up to a per-row constant: (a_i z_i·x_j − ½ a_i² ||x_j||²) / t_i².
    logits = torch.addr(z @ ref.T, a, (ref * ref).sum(1), alpha=-0.5)
    logits.mul_((a / t_safe**2)[:, None])
    if labels is not None and query_labels is not None:
        other = labels[None, :] != query_labels[:, None]
        if null_class is not None:
            other &= (query_labels != null_class)[:, None]
        own = torch.arange(xf.shape[0], device=x.device)
        other[own, own + offset] = False
        logits.masked_fill_(other, float("-inf"))
    x_hat = torch.softmax(logits, dim=1) @ ref
    v_hat = (ef - xf) + (xf - x_hat) / t_safe[:, None]
    v_hat = torch.where((tt > 0)[:, None], v_hat, ef - xf)
    return v_hat.to(x.dtype).view_as(x)


def target_velocity(
    estimate: str, x: Tensor, e: Tensor, t: Tensor, labels: Tensor | None, query_labels: Tensor | None, num_classes: int
) -> Tensor | None:
    """The velocity an objective regresses: None for "conditional" (the caller's e − x), else the
    batch-posterior estimate, per class for conditional nets (``labels`` before class dropout,
    ``query_labels`` after it)."""
    if estimate == "conditional":
        return None
    if num_classes == 0 or labels is None or query_labels is None:
        labels = query_labels = None
    # Under torch.distributed the reference set is the global batch (so W ranks with B/W samples
    # estimate what one process with B does); equal per-rank batch sizes, as the loop guarantees.
    reference = all_gather_rows(x.detach())
    labels = None if labels is None else all_gather_rows(labels)
    return batch_posterior_velocity(
        x, e, t, labels, query_labels, num_classes or None, reference=reference, offset=current().rank * x.shape[0]
    )


@torch.no_grad()
def velocity(
    net: nn.Module,
    z: Tensor,
    t: Tensor | float,
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    interval: tuple[float, float] | None = None,
) -> Tensor:
    """No-grad instantaneous velocity v_θ(z, t) = net(z, t, h=0, y), optionally guided (only for t
    in ``interval`` when given). (B, ...)."""
    t = batch_time(t, z)
    return guided_output(net, z, t, torch.zeros_like(t), y, guidance_scale, interval)
