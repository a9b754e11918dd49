"""``onestep eval``: score n-NFE samples of a model; rows go to RUN/metrics.jsonl."""

from __future__ import annotations

from onestep.cli.common import console, floats, guidance_label, model_step, resolve_guidance
from onestep.registry import ConfigError


def run(args) -> int:
    from onestep.config import EvalConfig
    from onestep.eval.evaluate import evaluate_model
    from onestep.eval.sample_cache import CACHE_DIR, SampleCacheRoot, model_identity
    from onestep.formats import open_model
    from onestep.registry import METRICS
    from onestep.sampling import with_sampler
    from onestep.utils import distributed
    from onestep.utils.device import pick_device
    from onestep.utils.rundir import run_of_checkpoint

    # Under torchrun every rank generates its share of the samples; rank 0 scores, writes and prints.
    dist_info = distributed.init_from_env(args.device)
    device = pick_device(args.device, dist_info.local_rank)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    for m in metrics or []:
        METRICS.get(m)
    run = open_model(args.run, device=device, ema=not args.no_ema, vae=args.vae)
    ev = run.cfg.eval if run.cfg is not None else EvalConfig()
    if (args.reference or "").startswith("real:"):
        return _eval_real(args, run, ev, metrics)
    nfes = args.nfe or ev.nfe
    omegas, interval = resolve_guidance(run, floats(args.guidance, "--guidance"), args.guidance_interval)
    run_dir = run_of_checkpoint(run.path)
    cache = None
    if run_dir is not None and not args.no_cache:
        cache = SampleCacheRoot(run_dir.path / CACHE_DIR, model_identity(run.path, "model" if args.no_ema else "ema"))
    try:
        objective = with_sampler(run.objective, args.sampler)
    except ValueError as exc:
        raise ConfigError(f"--sampler: {exc}") from None
    rows = evaluate_model(
        objective,
        run.net,
        run.dataset,
        nfes=nfes,
        metrics=metrics or ev.metrics,
        num_samples=args.num_samples or ev.num_samples,
        seed=ev.seed if args.seed is None else args.seed,
        batch_size=args.batch_size or ev.batch_size,
        device=device,
        step=run.step,
        weights="model" if args.no_ema else "ema",
        reference=args.reference or ev.reference,
        feature_extractor=args.feature_extractor or ev.feature_extractor,
        guidance=omegas,
        guidance_interval=interval,
        sample_cache=cache,
    )
    distributed.shutdown()
    if not dist_info.is_main:
        return 0
    if run_dir is not None:
        run_dir.append_metrics(rows)
    if cache is not None:
        cache.clear_used()
    from rich.table import Table

    table = Table(title=f"{run_dir.name if run_dir else run.path} — {model_step(run)}")
    guided = any(r.get("guidance") is not None for r in rows)
    for col in ("nfe", "metric", "value", "samples", "samples/s") + (("guidance",) if guided else ()):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["nfe"]),
            r["metric"],
            f"{r['value']:.5g}",
            str(r["num_samples"]),
            f"{r['samples_per_s']:.0f}",
            *((guidance_label(r),) if guided else ()),
        )
    out = console()
    out.print(table)
    for impl in sorted({f"{r['metric']}: {r['implementation']}; reference: {r['reference']}" for r in rows}):
        out.print(f"  {impl}")
    return 0


def _eval_real(args, run, ev, metrics) -> int:
    """``--reference real:SPLIT``: score real images of SPLIT through the same metrics (the floor a
    model's samples are compared with); printed, not written to the run."""
    from onestep.eval.evaluate import evaluate_real

    split = args.reference.split(":", 1)[1]
    if split not in ("train", "test"):
        raise ConfigError(f"--reference {args.reference}: the real-image reference is real:train or real:test")
    rows = evaluate_real(
        run.dataset,
        split=split,
        metrics=metrics or ev.metrics,
        num_samples=args.num_samples or ev.num_samples,
        seed=ev.seed if args.seed is None else args.seed,
    )
    from rich.table import Table

    table = Table(title=f"real {run.dataset.name} images ({split} split) scored as samples")
    for col in ("metric", "value", "samples"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["metric"], f"{r['value']:.5g}", str(r["num_samples"]))
    out = console()
    out.print(table)
    for impl in sorted({f"{r['metric']}: {r['implementation']}; reference: {r['reference']}" for r in rows}):
        out.print(f"  {impl}")
    return 0
