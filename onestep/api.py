"""The Python API: ``load_model`` and ``generate`` (also ``onestep.load_model`` / ``onestep.generate``).

::

    import onestep
    model = onestep.load_model("runs/meanflow_b2")          # a run, checkpoint, export, or FORMAT:PATH
    x, y = onestep.generate(model, 64, nfe=1, seed=0)       # the same numbers as `onestep sample`
    images = model.decode(x) if model.decode else x         # latents with a VAE -> images in [-1, 1]

    teacher = onestep.load_model("sit:SiT-XL-2-256x256.pt", device="cuda", vae="stabilityai/sd-vae-ft-mse")
    x, y = onestep.generate(teacher, 16, nfe=50, y=207, guidance=1.5)

Sample i uses noise seeded by (seed, i) and class i % C unless ``y`` says otherwise, exactly as
``onestep sample`` and ``onestep eval`` do (both go through ``onestep.eval.generate``), so the same
seed gives the same samples at any batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from onestep.config import Config
from onestep.data.base import Dataset
from onestep.eval.generate import generate as _generate
from onestep.formats import open_model
from onestep.registry import ConfigError
from onestep.sampling import with_guidance
from onestep.utils.device import pick_device

__all__ = ["Model", "load_model", "generate"]


@dataclass
class Model:
    """A loaded generator.

    ``net``: the network (backbone contract, eval mode, no gradients); ``objective``: its sampler
    (``sample_step``, ``time_grid``); ``data_shape`` / ``num_classes`` of one sample (0 classes:
    unconditional); ``decode``: latents -> images in [-1, 1] when a VAE is known (``data.vae`` or
    ``vae=``), else None; ``spec``: what was loaded; ``step``: the training step (None for public
    checkpoints); ``format``: ``onestep``, ``dit``, ``sit`` or ``repa_sit``; ``data``: the dataset or
    its stand-in; ``cfg``: the run's config (None for public checkpoints); ``device``;
    ``guidance``, ``guidance_interval``: the default guidance of ``generate`` (None: the model's own).
    """

    net: nn.Module
    objective: Any
    data_shape: tuple[int, ...]
    num_classes: int
    decode: Callable[[Tensor], Tensor] | None
    spec: str
    step: int | None
    format: str
    data: Dataset
    cfg: Config | None
    device: torch.device
    guidance: float | None = None
    guidance_interval: tuple[float, float] | None = None


def load_model(
    spec_or_run: Any,
    *,
    device: str | torch.device = "cpu",
    ema: bool = True,
    guidance: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    vae: str | None = None,
) -> Model:
    """Load a trained model for sampling, whatever wrote it.

    Args:
        spec_or_run: an onestep run directory, checkpoint file or export directory (a plain path), or
            ``FORMAT:PATH`` of a public checkpoint (``dit:``, ``sit:``, ``repa_sit:``; append
            ``#heads=N`` for non-standard widths).
        device: where the network lives (``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``).
        ema: the EMA weights of onestep runs (default) or the raw ones.
        guidance: the default guidance scale: the network input ω of guidance-conditioned models
            (improved_meanflow, applied on ``guidance_interval``), or the classifier-free guidance
            scale of models that guide at sampling time (flow-matching runs, public checkpoints).
            None keeps the run's own default.
        guidance_interval: the (t_lo, t_hi) interval on which guidance applies, or None.
        vae: decode latents with this VAE (Hugging Face id or local directory) instead of the run's.

    Returns:
        A ``Model`` (network, objective, data shape, number of classes, ``decode`` for latent models)
        that ``generate`` samples.

    Raises:
        ConfigError: a path that is no model, a corrupt file, or a guidance the model cannot take
            (one line naming it).
    """
    device = pick_device(str(device)) if isinstance(device, str) else torch.device(device)
    run = open_model(spec_or_run, device=device, ema=ema, vae=vae)
    try:
        with_guidance(run.objective, run.net, guidance, guidance_interval)  # checked now, applied per call
    except ValueError as exc:
        raise ConfigError(f"load_model: guidance: {exc}") from None
    data = run.dataset
    decode = data.decode if getattr(data, "decodes_to_images", False) else None
    return Model(
        net=run.net,
        objective=run.objective,
        data_shape=tuple(data.shape),
        num_classes=int(data.num_classes),
        decode=decode,
        spec=str(spec_or_run),
        step=run.step,
        format=run.format,
        data=data,
        cfg=run.cfg,
        device=device,
        guidance=guidance,
        guidance_interval=guidance_interval,
    )


def generate(
    model: Model,
    n: int,
    nfe: int = 1,
    y: int | Sequence[int] | Tensor | None = None,
    seed: int = 0,
    batch_size: int = 512,
    guidance: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Draw ``n`` samples of ``model`` in ``nfe`` network evaluations each.

    Args:
        model: what ``load_model`` returned.
        n: number of samples.
        nfe: network evaluations per sample (1 for one-step sampling).
        y: class labels of conditional models: None (class ``i % C`` for sample i), one class id for
            all, or n class ids (a sequence or tensor).
        seed: seeds the noise; the same seed gives the same samples on the same device.
        batch_size: samples per network call.
        guidance: overrides the model's guidance scale for this call (see ``load_model``).
        guidance_interval: overrides the model's guidance interval for this call.

    Returns:
        ``(samples, labels)``: samples ``(n, *data_shape)`` float32 on the CPU in the model's
        coordinates (latents for latent models: ``model.decode`` turns them into images), labels
        ``(n,)`` int64 or None for unconditional models.

    Raises:
        ConfigError: n, nfe or batch_size below 1, or labels a model cannot take.
    """
    if n < 1 or nfe < 1 or batch_size < 1:
        raise ConfigError(f"generate: n, nfe and batch_size must be >= 1, got {n}, {nfe}, {batch_size}")
    classes = model.num_classes
    class_id, labels = None, None
    if y is not None:
        if classes == 0:
            raise ConfigError("generate: y given but the model is unconditional")
        if isinstance(y, int) or (torch.is_tensor(y) and y.ndim == 0):
            class_id = int(y)
            given = torch.tensor([class_id])
        else:
            labels = torch.as_tensor(y, dtype=torch.long).reshape(-1)
            if labels.numel() != n:
                raise ConfigError(f"generate: got {labels.numel()} labels for n={n} samples")
            given = labels
        if given.numel() and not (0 <= int(given.min()) and int(given.max()) < classes):
            raise ConfigError(f"generate: class ids must be in 0..{classes - 1}")
    if guidance is None:
        guidance, guidance_interval = model.guidance, model.guidance_interval
    try:
        objective, cond = with_guidance(model.objective, model.net, guidance, guidance_interval)
    except ValueError as exc:
        raise ConfigError(f"generate: guidance: {exc}") from None
    return _generate(
        objective,
        model.net,
        model.data,
        num_samples=n,
        nfe=nfe,
        seed=seed,
        batch_size=batch_size,
        device=model.device,
        class_id=class_id,
        labels=labels,
        cond=cond,
    )
