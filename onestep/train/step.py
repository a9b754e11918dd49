"""One training step, the same for the training loop and ``tools/bench.py``:

    out   = objective.loss(net, x, y, step, feature_blocks, target_net)
    total = mean(out.loss) + Σ_k weight_k · reg_k(features of its blocks)
    backward -> all-reduce gradients over ranks (with the loss and a stop flag) -> clip -> optimizer
    -> EMA of the net (and of the objective's own parameters) -> the EMA target θ⁻ (if the objective
       declares one) ← μ(step)·θ⁻ + (1 − μ(step))·θ

Rows use one name per concept: ``loss`` the total, ``loss_main`` the objective's mean loss,
``loss_<label>`` each regularizer's unweighted value, then the objective's own diagnostics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from onestep.build import RegularizerTerm
from onestep.regularizers.dispersive import feature_rms
from onestep.train.ema import EMA
from onestep.utils import distributed
from onestep.utils.device import autocast_ctx


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm was not finite; nothing was updated."""

    def __init__(self, what: str, value: float):
        self.what, self.value = what, value
        super().__init__(f"non-finite {what} ({value})")


def make_optimizer(
    params: list[nn.Parameter], name: str, lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.Optimizer:
    """adam | adamw | sgd (momentum = betas[0])."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=betas[0], weight_decay=weight_decay)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


class TrainStep:
    """The objects one step needs and the step itself (module docstring).

    ``net`` is the plain module (checkpoints, EMA); ``train_net`` what the objective calls (a
    ``torch.compile`` wrapper of it, or the net). The objective's own parameters
    (``objective.trainable``) are optimized, EMA'd and all-reduced with the net's.
    """

    def __init__(
        self,
        net: nn.Module,
        objective,
        regularizers: list[RegularizerTerm],
        optimizer: torch.optim.Optimizer,
        *,
        ema_decay: float,
        ema_warmup: bool = False,
        precision: str = "fp32",
        grad_clip: float | None = None,
        train_net: nn.Module | None = None,
        device: torch.device | None = None,
        world_size: int = 1,
    ):
        self.net, self.objective, self.regs, self.opt = net, objective, list(regularizers), optimizer
        self.train_net = train_net if train_net is not None else net
        self.trainable = objective.trainable
        self.params = list(net.parameters()) + (list(self.trainable.parameters()) if self.trainable else [])
        self.feature_blocks = tuple(sorted({b for r in self.regs for b in r.blocks}))
        self.precision, self.grad_clip = precision, grad_clip
        self.device = device if device is not None else next(net.parameters()).device
        self.world_size = world_size
        self.ema = EMA(net, ema_decay, ema_warmup)
        self.trainable_ema = EMA(self.trainable, ema_decay, ema_warmup) if self.trainable else None
        uses_target = objective.target_decay(0) is not None
        self.target = EMA(net, 0.0) if uses_target else None  # θ⁻, updated with the objective's μ(step)

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor | None, *, step: int, lr: float, stop: bool = False
    ) -> tuple[dict[str, float], bool]:
        """One step; returns (row, any rank asked to stop). Raises ``NonFiniteError`` before updating."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.net.train()
        if self.trainable is not None:
            self.trainable.train()
        # Objective loss (per sample) and the regularizers on its gradient-carrying features.
        # The EMA target goes only to objectives that declare one (target_decay).
        extra = {} if self.target is None else {"target_net": self.target.model}
        with autocast_ctx(self.device, self.precision, cache=not self.objective.uses_jvp):
            out = self.objective.loss(self.train_net, x, y, step=step, feature_blocks=self.feature_blocks, **extra)
        main = out.loss.float().mean()
        total = main
        terms = {"loss_main": main.detach()}
        feats = dict(zip(self.feature_blocks, out.features))
        for reg in self.regs:
            value = torch.stack([reg.fn(feats[b].float()) for b in reg.blocks]).mean()
            total = total + reg.weight * value
            terms[f"loss_{reg.label}"] = value.detach()
            terms[f"feature_rms_{reg.label}"] = feature_rms([feats[b] for b in reg.blocks])
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        # Average gradients over ranks; the loss and the stop flag ride along in the same all-reduce.
        extras = torch.stack([total.detach().float(), torch.tensor(float(stop), device=total.device)])
        extras = distributed.sync_gradients(self.params, extras, self.world_size)
        loss_value, stop_flag = extras.tolist()
        if not math.isfinite(loss_value):
            raise NonFiniteError("loss", loss_value)
        clip = self.grad_clip if self.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip).item()
        if not math.isfinite(grad_norm):
            raise NonFiniteError("gradient norm", grad_norm)
        self.opt.step()
        self.ema.update(self.net, step)
        if self.trainable_ema is not None:
            self.trainable_ema.update(self.trainable, step)
        if self.target is not None:
            self.target.update(self.net, step, decay=self.objective.target_decay(step))
        row = {k: float(v) for k, v in out.logs.items()}
        row.update({k: v.item() for k, v in terms.items()})
        row.update({"loss": loss_value, "grad_norm": grad_norm, "lr": lr})
        return row, stop_flag > 0

    # -- state --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a checkpoint holds of the training state (besides step and config)."""
        state = {"model": self.net.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict()}
        if self.trainable is not None:
            state["objective_params"] = self.trainable.state_dict()
            state["objective_params_ema"] = self.trainable_ema.state_dict()
        if self.target is not None:
            state["target_net"] = self.target.state_dict()
        return state

    def load_state(self, state: dict[str, Any], step: int) -> None:
        """Restore a checkpoint's training state (``state`` from ``state()``, or an older checkpoint whose
        consistency EMA target lived in ``state["objective"]``)."""
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        if self.trainable is not None and "objective_params" in state:
            self.trainable.load_state_dict(state["objective_params"])
            self.trainable_ema.load_state_dict(state["objective_params_ema"])
        if self.target is None:
            return
        if "target_net" in state:
            self.target.load_state_dict(state["target_net"])
        elif isinstance(state.get("objective"), dict) and "target" in state["objective"]:
            # Before the loop owned it, the target was updated lazily at the next loss call: apply the
            # update that belongs after the last saved optimizer step.
            self.target.load_state_dict(state["objective"]["target"])
            current = int(state["objective"].get("step", step))
            if current < step:
                self.target.update(self.net, step - 1, decay=self.objective.target_decay(step - 1))
        else:
            self.target.load_state_dict(self.net.state_dict())
