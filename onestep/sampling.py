"""The only sampling loop: previews, ``onestep sample`` and ``onestep eval`` all call ``sample``."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from onestep.utils.seeding import renoise_seed, seeded_noise


def guidance_cond(omega: float | None, interval=None) -> dict[str, float] | None:
    """The ``cond`` of guidance scale ``omega`` applied on ``interval`` = (t_min, t_max) (default
    [0, 1]); None when ``omega`` is None (no guidance input: the backbone's ω = 1 on [0, 1]).
    ValueError for ω < 1 or an interval outside 0 <= t_min <= t_max <= 1."""
    if omega is None:
        if interval is not None:
            raise ValueError("a guidance interval needs a guidance scale")
        return None
    omega = float(omega)
    if not omega >= 1.0 or omega == float("inf"):
        raise ValueError(f"guidance scale must be a finite number >= 1 (1 = unguided), got {omega}")
    t_min, t_max = (0.0, 1.0) if interval is None else (float(interval[0]), float(interval[1]))
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= t_min <= t_max <= 1, got [{t_min}, {t_max}]")
    return {"omega": omega, "t_min": t_min, "t_max": t_max}


def check_guidance(objective, net: nn.Module) -> None:
    """ValueError (one line) unless ``objective`` samples with ``cond`` and ``net`` takes guidance conditions."""
    base = getattr(net, "_orig_mod", net)
    if not getattr(objective, "accepts_cond", False) or not getattr(base, "cond_keys", ()):
        why = (
            f"objective {type(objective).__name__} does not sample with guidance conditions"
            if not getattr(objective, "accepts_cond", False)
            else f"backbone {type(base).__name__} was built without guidance conditions"
        )
        raise ValueError(
            f"this model is not guidance-conditioned ({why}); guidance as a network input needs a "
            f"model trained by improved_meanflow on a backbone with guidance conditions"
        )


def is_guidance_conditioned(objective, net: nn.Module) -> bool:
    """The model takes its guidance scale as a network input (``check_guidance`` passes)."""
    try:
        check_guidance(objective, net)
    except ValueError:
        return False
    return True


def with_guidance(objective, net: nn.Module, omega: float | None, interval=None) -> tuple[object, dict | None]:
    """(objective, cond) that sample with guidance scale ``omega`` (None: as the model is).

    Guidance-conditioned models (improved_meanflow) get ω and the interval as network inputs
    (``cond``); models that guide when sampling (flow matching: classifier-free guidance on all
    channels) get a copy of the objective with ``guidance_scale = omega``; others (MeanFlow and the
    consistency models fold guidance into training) are refused. ValueError names what is wrong."""
    if omega is None:
        if interval is not None:
            raise ValueError("a guidance interval needs a guidance scale")
        return objective, None
    if is_guidance_conditioned(objective, net):
        return objective, guidance_cond(omega, interval)
    if not hasattr(objective, "guidance_scale"):
        raise ValueError(
            f"objective {type(objective).__name__} has no sampling-time guidance: it folds guidance "
            f"into training (cfg_omega / teacher_guidance); guidance as an input needs a model trained "
            f"by improved_meanflow on a backbone with guidance conditions"
        )
    if interval is not None:
        raise ValueError(
            "a guidance interval is an input of guidance-conditioned models (improved_meanflow); "
            "classifier-free guidance at sampling applies at every step"
        )
    if not float(omega) >= 0:
        raise ValueError(f"guidance scale must be >= 0, got {omega}")
    guided = copy.copy(objective)
    guided.guidance_scale = float(omega)
    return guided, None


def with_sampler(objective, sampler: str | None):
    """``objective`` (``sampler`` None), or a copy sampling with ``sampler`` ("euler" or "restart": the
    flow-map samplers of MeanFlow, α-Flow and DMF, ``objectives.flow_map``); ValueError for an
    objective with one sampler of its own."""
    if sampler is None:
        return objective
    if not hasattr(objective, "set_sampler"):
        raise ValueError(
            f"objective {type(objective).__name__} has one sampler of its own; --sampler is for flow maps "
            f"(meanflow, dmf)"
        )
    chosen = copy.copy(objective)
    chosen.set_sampler(sampler, objective.time_shift)
    return chosen


@torch.no_grad()
def sample(
    objective,
    net: nn.Module,
    noise: Tensor,
    y: Tensor | None = None,
    nfe: int = 1,
    grid: Tensor | None = None,
    seeds=None,
    cond: dict | None = None,
) -> Tensor:
    """Integrate from noise (t = 1) to data (t = 0) in ``nfe`` network calls.

    noise: (B, ...) standard normal; y: (B,) class ids or None; grid: descending times of length
    nfe + 1 (default ``objective.time_grid(nfe)``). Returns (B, ...) samples in data coordinates.
    ``cond``: guidance conditions {"omega", "t_min", "t_max"} passed to every ``sample_step``
    (objectives with ``accepts_cond``, guidance-conditioned backbones; ``guidance_cond`` builds it).
    Objectives with ``stochastic_sampling`` (multi-step consistency sampling re-noises between
    steps) get fresh noise per step: with ``seeds`` (one per sample) it is drawn per sample from
    (seed, step), so a sample does not depend on its batch or rank; without, from the global RNG.
    """
    grid = objective.time_grid(nfe) if grid is None else torch.as_tensor(grid, dtype=torch.float32)
    if grid.ndim != 1 or len(grid) < 2:
        raise ValueError(f"grid must be 1-D with at least 2 times, got shape {tuple(grid.shape)}")
    if seeds is not None and len(seeds) != noise.shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {noise.shape[0]}")
    stochastic = bool(getattr(objective, "stochastic_sampling", False))
    if cond is not None:
        check_guidance(objective, net)
    x = objective.prior(noise)
    for k, (t, r) in enumerate(zip(grid[:-1].tolist(), grid[1:].tolist())):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        rr = torch.full((x.shape[0],), r, device=x.device, dtype=x.dtype)
        extra = {} if cond is None else {"cond": cond}
        if stochastic and seeds is not None and r > 0:
            extra["noise"] = seeded_noise([renoise_seed(s, k) for s in seeds], tuple(x.shape[1:]), x.device, x.dtype)
        x = objective.sample_step(net, x, tt, rr, y, **extra)
    return x


def balanced_labels(indices, num_classes: int) -> Tensor | None:
    """Class i % num_classes for sample index i (None when unconditional)."""
    if num_classes <= 0:
        return None
    return torch.as_tensor(list(indices), dtype=torch.long) % num_classes
