"""``onestep sample``: samples of a model as a PNG grid or an NPZ file."""

from __future__ import annotations

from pathlib import Path

from onestep.cli.common import model_step, resolve_guidance
from onestep.registry import ConfigError


def run(args) -> int:
    import numpy as np

    from onestep.eval.evaluate import decodes_to_images
    from onestep.eval.fidelity import to_uint8_rgb
    from onestep.eval.generate import generate
    from onestep.formats import open_model
    from onestep.sampling import with_guidance, with_sampler
    from onestep.utils.device import pick_device
    from onestep.viz import save_samples_png, to_uint8_images

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise ConfigError(f"--out must end in .png or .npz, got '{out.name}'")
    device = pick_device(args.device)
    run = open_model(args.run, device=device, ema=not args.no_ema, vae=args.vae)
    if args.class_id is not None and not 0 <= args.class_id < run.dataset.num_classes:
        raise ConfigError(
            f"--class {args.class_id}: this run has {run.dataset.num_classes} classes "
            f"(allowed 0..{run.dataset.num_classes - 1})"
            if run.dataset.num_classes
            else "--class: this run is unconditional"
        )
    if args.latents and run.dataset.kind != "latent":
        raise ConfigError(f"--latents: this run's data '{run.dataset.name}' is {run.dataset.kind} data, not latents")
    # Latent runs with a VAE: decode every batch on the device into uint8 images right away.
    decode = decodes_to_images(run.dataset) and not args.latents
    transform = (lambda x: to_uint8_rgb(run.dataset.decode(x))) if decode else None
    requested = [args.guidance] if args.guidance is not None else None
    omegas, interval = resolve_guidance(run, requested, args.guidance_interval)
    omega = omegas[0]
    try:
        sampled = with_sampler(run.objective, args.sampler)
    except ValueError as exc:
        raise ConfigError(f"--sampler: {exc}") from None
    try:
        objective, cond = with_guidance(sampled, run.net, omega, interval if omega is not None else None)
    except ValueError as exc:
        raise ConfigError(f"--guidance: {exc}") from None
    x, y = generate(
        objective,
        run.net,
        run.dataset,
        num_samples=args.n,
        nfe=args.nfe,
        seed=args.seed,
        batch_size=args.batch_size,
        device=device,
        class_id=args.class_id,
        transform=transform,
        cond=cond,
    )
    kind = "image" if decode else run.dataset.kind
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        ncol = run.dataset.num_classes if args.class_id is None and 0 < run.dataset.num_classes <= 16 else None
        save_samples_png(x, kind, out, ncol=ncol)
    else:
        arrays = {"arr_0": to_uint8_images(x) if kind == "image" else x.numpy().astype(np.float32)}
        if y is not None:
            arrays["arr_1"] = y.numpy().astype(np.int64)
        np.savez(out, **arrays)
    what = "VAE-decoded images" if decode else "latents (model coordinates)" if kind == "latent" else "samples"
    guided = (
        ""
        if omega is None
        else f", guidance {omega:g}" + ("" if cond is None else f" on [{cond['t_min']:g}, {cond['t_max']:g}]")
    )
    print(f"wrote {len(x)} {what} ({args.nfe} NFE{guided}, {model_step(run)}) to {out}")
    return 0
