"""The ``onestep`` command line: train, sample, eval, export, compare, ls, validate.

Config -> kwargs conversion happens here and in ``onestep.build``; the library below never parses argv.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

from onestep.registry import ConfigError

EPILOG = "Docs: README.md. Recipes: `onestep ls recipes`."


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _split_recipe_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    recipe, overrides = None, []
    for item in items:
        if "=" in item or recipe is not None:
            overrides.append(item)
        else:
            recipe = item
    return recipe, overrides


# --------------------------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from onestep.config import apply_overrides, find_recipe, from_dict, load_config
    from onestep.utils import distributed
    from onestep.utils.rundir import RunDir

    recipe, overrides = _split_recipe_and_overrides(args.items)
    dist_info = distributed.init_from_env() if not args.dry_run else distributed.DistInfo()
    if args.resume:
        run_dir = Path(args.resume)
        if not RunDir(run_dir).is_run():
            raise ConfigError(f"--resume {run_dir}: not a run directory (no {RunDir.CONFIG})")
        if recipe is not None:
            raise ConfigError("--resume takes its recipe from RUN/config.yaml; pass only KEY=VALUE overrides")
        raw = RunDir(run_dir).read_config()
        raw.pop("meta", None)
        cfg = from_dict(apply_overrides(raw, overrides))
        name = run_dir.name
    else:
        if recipe is None:
            raise ConfigError("train needs a RECIPE (a YAML path or a name from `onestep ls recipes`)")
        cfg = load_config(recipe, overrides)
        name = find_recipe(recipe).stem
        run_dir = (
            Path(args.run_dir) if args.run_dir else Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        )
    if args.dry_run:
        return _dry_run(cfg, run_dir)
    run_dir = Path(distributed.broadcast_object(str(run_dir)))  # every rank writes to rank 0's choice
    from onestep.train.loop import TrainingInterrupted, train

    console = _console(stderr=True)
    try:
        with ExitStack() as held:
            # Rank 0 holds the run directory's writer lock for the whole run; a directory holding an
            # earlier run is refused unless resumed. Every rank learns the verdict.
            problem = None
            if dist_info.is_main:
                run = RunDir(run_dir)
                try:
                    held.enter_context(run.lock())
                    if not args.resume and run.leftovers():
                        problem = (
                            f"{run_dir} already holds a run ({', '.join(run.leftovers())}); continue it "
                            f"with --resume {run_dir} or pick another --run-dir"
                        )
                except ConfigError as exc:
                    problem = str(exc)
            problem = distributed.broadcast_object(problem)
            if problem:
                raise ConfigError(problem)
            out = train(
                cfg, run_dir, resume=bool(args.resume), argv=sys.argv, console=console, progress=not args.no_progress
            )
    except TrainingInterrupted as exc:
        if dist_info.is_main:
            print(f"onestep train: stopped by {exc}", file=sys.stderr)
            print(exc.run_dir)
        return 128 + exc.signum
    finally:
        distributed.shutdown()
    if dist_info.is_main:
        print(
            f"next: onestep eval {out} --nfe 1 --nfe 2 && onestep compare {out}   "
            f"(or onestep sample {out} --out samples.png)",
            file=sys.stderr,
        )
        print(out)
    return 0


def _dry_run(cfg, run_dir: Path) -> int:
    from onestep.build import backbone_kwargs, check_buildable
    from onestep.config import dump_yaml, to_plain

    check = check_buildable(cfg)
    if check.data_note:
        _console(stderr=True).print(
            f"[yellow]note:[/] data not loaded ({check.data_note}); "
            f"using backbone input_shape/num_classes from the recipe"
        )
    for note in _checkpoint_notes(cfg):
        _console(stderr=True).print(f"[yellow]note:[/] {note}")
    resolved = cfg.to_dict()
    resolved["backbone"] = {"name": cfg.backbone["name"], **to_plain(backbone_kwargs(cfg, check.dataset))}
    print(dump_yaml(resolved), end="")
    n = check.parameters
    print(f"# backbone {cfg.backbone['name']}: {n:,} parameters ({n / 1e6:.1f}M)")
    if check.inference_parameters is not None and check.inference_parameters != n:
        k = check.inference_parameters
        print(
            f"# inference model (without the training-only v-head): {k:,} parameters ({k / 1e6:.1f}M); "
            f"training: {n / 1e6:.1f}M"
        )
    print(f"# dry run: nothing trained; the run would be written to {run_dir}")
    return 0


def _checkpoint_notes(cfg) -> list[str]:
    """Notes on the checkpoints a recipe names (objective.teacher, train.init_from) whose files are
    not here; a bad spec (unknown format, a format that cannot initialise) is a ConfigError."""
    from onestep.formats import spec_note

    specs = [("objective.teacher", cfg.objective.get("teacher"), False), ("train.init_from", cfg.train.init_from, True)]
    notes = [spec_note(spec, where=where, init=init) for where, spec, init in specs if isinstance(spec, str)]
    return [n for n in notes if n]


def _model_step(run) -> str:
    return f"step {run.step}" if run.step is not None else f"{run.format} checkpoint"


# --------------------------------------------------------------------------------------------- sample
def cmd_sample(args) -> int:
    import numpy as np

    from onestep.eval.evaluate import decodes_to_images
    from onestep.eval.fidelity import to_uint8_rgb
    from onestep.eval.generate import generate
    from onestep.formats import open_model
    from onestep.sampling import with_guidance
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
    omegas, interval = _guidance(run, [args.guidance] if args.guidance is not None else None, args.guidance_interval)
    omega = omegas[0]
    try:
        objective, cond = with_guidance(run.objective, run.net, omega, interval if omega is not None else None)
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
    print(f"wrote {len(x)} {what} ({args.nfe} NFE{guided}, {_model_step(run)}) to {out}")
    return 0


def _floats(text: str | None, option: str) -> list[float] | None:
    """'1,2.5' -> [1.0, 2.5] (None stays None); a ConfigError naming ``option`` otherwise."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{option} takes comma-separated numbers, got '{text}'")
    return values


def _guidance(run, omegas: list[float] | None, interval: str | None) -> tuple[list[float | None], list | None]:
    """(guidance values, interval): --guidance / --guidance-interval, else the run's eval.guidance /
    eval.guidance_interval ([None]: the model as it is). ``sampling.with_guidance`` decides what a value
    means for the model (a network input ω, or a classifier-free guidance scale) and refuses others."""
    window = _floats(interval, "--guidance-interval")
    if window is not None and len(window) != 2:
        raise ConfigError(f"--guidance-interval takes two numbers T_MIN,T_MAX, got '{interval}'")
    if omegas is None:
        if window is not None:
            raise ConfigError("--guidance-interval needs --guidance (the guidance scale)")
        ev = run.cfg.eval if run.cfg is not None else None
        if ev is None or ev.guidance is None:
            return [None], None
        return (list(ev.guidance) if isinstance(ev.guidance, list) else [ev.guidance]), ev.guidance_interval
    return omegas, window


# --------------------------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from onestep.config import EvalConfig
    from onestep.eval.evaluate import evaluate_model
    from onestep.eval.sample_cache import CACHE_DIR, SampleCacheRoot, model_identity
    from onestep.formats import open_model
    from onestep.registry import METRICS
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
    omegas, interval = _guidance(run, _floats(args.guidance, "--guidance"), args.guidance_interval)
    run_dir = run_of_checkpoint(run.path)
    cache = None
    if run_dir is not None and not args.no_cache:
        cache = SampleCacheRoot(run_dir.path / CACHE_DIR, model_identity(run.path, "model" if args.no_ema else "ema"))
    rows = evaluate_model(
        run.objective,
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

    table = Table(title=f"{run_dir.name if run_dir else run.path} — {_model_step(run)}")
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
            *((_guidance_label(r),) if guided else ()),
        )
    console = _console()
    console.print(table)
    for impl in sorted({f"{r['metric']}: {r['implementation']}; reference: {r['reference']}" for r in rows}):
        console.print(f"  {impl}")
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
    console = _console()
    console.print(table)
    for impl in sorted({f"{r['metric']}: {r['implementation']}; reference: {r['reference']}" for r in rows}):
        console.print(f"  {impl}")
    return 0


def cmd_suite(args) -> int:
    from onestep import suite

    args.overrides = [x for x in args.items if "=" in x]
    args.suite = [x for x in args.items if "=" not in x]
    if not args.suite:
        raise ConfigError("suite needs a suite file or recipes (KEY=VALUE items are overrides)")
    return suite.main(args, echo=lambda line: print(line, file=sys.stderr, flush=True))


def _guidance_label(row: dict) -> str:
    if row.get("guidance") is None:
        return "-"
    if row.get("guidance_interval") is None:
        return f"{row['guidance']:g}"
    lo, hi = row["guidance_interval"]
    return f"{row['guidance']:g} on [{lo:g}, {hi:g}]"


# --------------------------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from onestep.formats import export_model

    out = export_model(args.run, args.out, ema=not args.no_ema, force=args.force)
    print(out)
    return 0


# --------------------------------------------------------------------------------------------- compare
def cmd_compare(args) -> int:
    from onestep.report.compare import PUBLISHED, build_table, render, summarize_run

    runs = [summarize_run(r) for r in args.runs]
    published = None
    if args.published:
        datas = {r.info["data"] for r in runs}
        mapping = {"cifar10": "cifar10", "latents": "imagenet256", "imagenet_latents": "imagenet256"}
        wanted = {mapping[d] for d in datas if d in mapping}
        published = [p for p in PUBLISHED if args.published == "all" or p["data"] in wanted]
        if not published:
            print(
                f"note: no published numbers for data {', '.join(sorted(datas))} (there are some for "
                f"{', '.join(sorted({p['data'] for p in PUBLISHED}))}; --published all shows them anyway)",
                file=sys.stderr,
            )
    header, rows, notes = build_table(runs, published)
    print(render(header, rows, notes, fmt=args.format), end="")
    return 0


def cmd_plot(args) -> int:
    from onestep.report.plot import plot_runs

    out = args.out or (str(Path(args.runs[0]) / "plots") if len(args.runs) == 1 else "plots")
    for path in plot_runs(args.runs, out):
        print(path)
    return 0


# --------------------------------------------------------------------------------------------- ls / validate
def cmd_ls(args) -> int:
    import fnmatch
    import inspect

    from onestep.config import REPO_RECIPES
    from onestep.registry import REGISTRIES

    kinds = [args.kind] if args.kind else list(REGISTRIES) + ["recipes"]
    for kind in kinds:
        if kind == "recipes":
            found = {}
            for root in (REPO_RECIPES, Path.cwd() / "recipes"):  # ./recipes wins on a name clash
                if root.is_dir():
                    found.update({p.stem: p for p in root.glob("*.yaml")})
            entries = [(n, _recipe_summary(found[n])) for n in sorted(found)]
        else:
            if kind not in REGISTRIES:
                raise ConfigError(f"unknown kind '{kind}'; allowed: {', '.join(list(REGISTRIES) + ['recipes'])}")
            reg = REGISTRIES[kind]
            entries = []
            for n in reg.names():
                if n.startswith("test_") and not args.all:
                    continue  # the tiny variants the tests build
                doc = inspect.getdoc(reg.get(n)) or ""
                doc = doc.splitlines()[0] if doc else ""
                if kind == "backbones":
                    doc = f"{_backbone_summary(reg, n)}  {doc}"
                entries.append((n, doc))
        if args.pattern:
            entries = [e for e in entries if fnmatch.fnmatch(e[0], f"*{args.pattern}*")]
        print(f"{kind}:")
        for n, doc in entries:
            print(f"  {n:<28} {doc}".rstrip())
    return 0


def _recipe_summary(path: Path) -> str:
    """The recipe's first comment line (what it trains and where it runs)."""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("# ").rstrip()
        if line:
            break
    return ""


def _backbone_summary(reg, name: str) -> str:
    """Blocks, default encoder blocks and parameters at the factory's default input (built on 'meta')."""
    import torch

    try:
        with torch.device("meta"):
            net = reg.build(name)
    except Exception:  # a factory without defaults for every argument
        return ""
    params = sum(p.numel() for p in net.parameters())
    return f"blocks={net.num_blocks:<3} encoder={list(net.encoder_blocks)!s:<6} params={params / 1e6:7.2f}M"


def cmd_validate(args) -> int:
    from onestep.build import check_buildable
    from onestep.config import load_config

    recipe, overrides = _split_recipe_and_overrides(args.items)
    if recipe is None:
        raise ConfigError("validate needs a RECIPE")
    cfg = load_config(recipe, overrides)
    check = check_buildable(cfg)
    notes = ([f"data not loaded: {check.data_note}"] if check.data_note else []) + _checkpoint_notes(cfg)
    note = f" ({'; '.join(notes)})" if notes else ""
    print(
        f"OK {recipe}: data={cfg.data['name']} backbone={cfg.backbone['name']} ({check.parameters / 1e6:.2f}M) "
        f"objective={cfg.objective['name']} regularizers={[r['name'] for r in cfg.regularizers]} "
        f"steps={cfg.train.steps}{note}"
    )
    return 0


# --------------------------------------------------------------------------------------------- main
def _int_at_least(low: int):
    """An argparse type: a whole number >= ``low`` (refused at parsing with one line otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


TRAIN_EPILOG = """overrides: KEY=VALUE with dotted keys into the recipe, e.g.
  onestep train toy_meanflow train.steps=500 train.lr=1e-3 objective.ratio_r_neq_t=0.5
  onestep train digits_meanflow "regularizers=[{name: dispersive, weight: 0.25}]"
values are YAML (numbers, true/false, [lists], {maps}); unknown keys and wrong types stop at once.
The run directory is the last line on stdout; the next commands go to stderr."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onestep", description="One-step generators: train, sample, eval, compare.", epilog=EPILOG
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train from a recipe (or resume a run)",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("items", nargs="*", metavar="RECIPE [KEY=VALUE ...]")
    t.add_argument("--run-dir", help="output directory (default runs/RECIPE-TIMESTAMP)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from checkpoints/last.pt")
    t.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and parameter count, train nothing"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="write samples of a run (or any checkpoint) as PNG or NPZ")
    s.add_argument("run", metavar="RUN_DIR|CKPT|EXPORT|FORMAT:PATH")
    s.add_argument("--nfe", type=_positive_int, default=1)
    s.add_argument("-n", type=_positive_int, default=64, help="number of samples")
    s.add_argument("--seed", type=_non_negative_int, default=0)
    s.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    s.add_argument("--class", dest="class_id", type=int, default=None, help="sample only this class")
    s.add_argument("--batch-size", type=_positive_int, default=512)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True, help="FILE.png (grid / density) or FILE.npz (arr_0, arr_1)")
    s.add_argument(
        "--latents",
        action="store_true",
        help="latent runs with data.vae: write the raw latents (float32 arr_0) instead of decoded images",
    )
    _model_options(s, sweep=False)
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("eval", help="score n-NFE samples; rows go to RUN/metrics.jsonl")
    e.add_argument("run", metavar="RUN_DIR|CKPT|EXPORT|FORMAT:PATH")
    e.add_argument(
        "--nfe", type=_positive_int, action="append", help="repeat for several (default: eval.nfe of the recipe)"
    )
    e.add_argument("--metrics", help="comma-separated metric names (`onestep ls metrics`)")
    e.add_argument("--num-samples", type=_positive_int)
    e.add_argument("--seed", type=_non_negative_int)
    e.add_argument("--batch-size", type=_positive_int)
    e.add_argument("--no-ema", action="store_true")
    e.add_argument(
        "--no-cache",
        action="store_true",
        help="do not keep generated batches in RUN/eval_cache (by default a killed eval resumes from them)",
    )
    e.add_argument("--device", default="auto")
    e.add_argument(
        "--reference",
        help="fid/kid/prc reference: image FOLDER (ADM center crop), STATS.npz from "
        "tools/fid_stats.py, ADM reference batch .npz, or a dataset name "
        "(default: eval.reference, else the training images)",
    )
    e.add_argument(
        "--feature-extractor",
        help="torch-fidelity feature extractor for fid/isc/kid/prc "
        "(default: eval.feature_extractor, else each metric's own)",
    )
    _model_options(e, sweep=True)
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="write a run's model as DIR/{model.safetensors, config.yaml, README.md}")
    x.add_argument("run", metavar="RUN_DIR|CKPT")
    x.add_argument("--out", required=True, metavar="DIR", help="the export directory (refused if not empty)")
    x.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    x.add_argument("--force", action="store_true", help="overwrite the files of a non-empty DIR")
    x.set_defaults(fn=cmd_export)

    c = sub.add_parser("compare", help="one table over runs (and published numbers)")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR")
    c.add_argument(
        "--published",
        nargs="?",
        const="auto",
        choices=["auto", "all"],
        help="add the published rows (docs/reference.md) for the runs' dataset ('all': every row)",
    )
    c.add_argument("--format", choices=["rich", "md", "csv"], default="rich")
    c.set_defaults(fn=cmd_compare)

    su = sub.add_parser("suite", help="train and score a list of recipes into one results table (resumable)")
    su.add_argument(
        "items",
        nargs="+",
        metavar="SUITE.yaml|RECIPE|KEY=VALUE",
        help="a suite file (recipes/suites/*.yaml) or recipes; KEY=VALUE overrides apply to every run",
    )
    su.add_argument("--jobs", type=_positive_int, default=1, help="commands at once (each gets cores/N threads)")
    su.add_argument("--root", help="folder of the run directories (default: the suite's root)")
    su.add_argument("--only", help="comma-separated run names (and what they depend on)")
    su.add_argument("--report-only", action="store_true", help="rewrite the tables and figures; train nothing")
    su.set_defaults(fn=cmd_suite)

    pl = sub.add_parser("plot", help="PNG training curves and metric-vs-step plots (needs matplotlib)")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", help="output folder (default RUN/plots, or ./plots for several runs)")
    pl.set_defaults(fn=cmd_plot)

    ls = sub.add_parser("ls", help="list registered components or recipes")
    ls.add_argument("kind", nargs="?", help="backbones|objectives|regularizers|datasets|metrics|formats|recipes")
    ls.add_argument("pattern", nargs="?")
    ls.add_argument("--all", action="store_true", help="include the tiny test_* components")
    ls.set_defaults(fn=cmd_ls)

    v = sub.add_parser("validate", help="check a recipe (and overrides) without building anything big")
    v.add_argument("items", nargs="+", metavar="RECIPE [KEY=VALUE ...]")
    v.set_defaults(fn=cmd_validate)
    return p


def _model_options(p: argparse.ArgumentParser, sweep: bool) -> None:
    what = (
        "guidance scale: the input ω of a guidance-conditioned model (improved_meanflow), or classifier-free "
        "guidance on all channels for models that guide when sampling (flow-matching runs, public "
        "checkpoints); default eval.guidance"
    )
    if sweep:
        p.add_argument("--guidance", metavar="W[,W...]", help=what + "; several values: a sweep, rows per value")
    else:
        p.add_argument("--guidance", type=float, metavar="W", help=what)
    p.add_argument(
        "--guidance-interval",
        metavar="T_MIN,T_MAX",
        help="times the guidance applies to (guidance-conditioned models; default 0,1)",
    )
    p.add_argument(
        "--vae",
        default=None,
        help="decode latents with this VAE (Hugging Face id or local directory; default data.vae of the run)",
    )


# Idle OpenMP threads spin 300 000 iterations (libgomp's default) before sleeping, so two runs on one
# machine starve each other; 1000 keeps a solo run near full speed and two runs near half each
# (measured: docs/cli.md, "Several runs on one machine"). Set before torch loads libgomp; an explicit
# GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins.
OPENMP_SPIN = "1000"


def _tame_openmp_spinning() -> None:
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN


def main(argv: list[str] | None = None) -> int:
    import warnings

    _tame_openmp_spinning()
    # torch's own forward-AD decompositions call torch.jit.script (deprecated in torch >= 2.10): not ours to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides given after an option land here
        if hasattr(args, "items") and all("=" in e and not e.startswith("-") for e in extra):
            args.items += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from onestep.train.loop import TrainingError

    try:
        return args.fn(args) or 0
    except ConfigError as exc:
        print(f"onestep {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        # A bad value or file that a component refused: one line, unless ONESTEP_DEBUG asks for the traceback.
        if os.environ.get("ONESTEP_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(
            f"onestep {args.command}: error: {type(exc).__name__}: {first} (ONESTEP_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2
    except TrainingError as exc:
        print(f"onestep {args.command}: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"onestep {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
