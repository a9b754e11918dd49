"""``onestep train``: train from a recipe, resume a run, or print the resolved recipe (--dry-run)."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

from onestep.cli.common import checkpoint_notes, console, split_recipe_and_overrides
from onestep.registry import ConfigError


def run(args) -> int:
    from onestep.config import apply_overrides, find_recipe, from_dict, load_config
    from onestep.utils import distributed
    from onestep.utils.rundir import RunDir

    recipe, overrides = split_recipe_and_overrides(args.items)
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

    err = console(stderr=True)
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
                cfg, run_dir, resume=bool(args.resume), argv=sys.argv, console=err, progress=not args.no_progress
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
        console(stderr=True).print(
            f"[yellow]note:[/] data not loaded ({check.data_note}); "
            f"using backbone input_shape/num_classes from the recipe"
        )
    for note in checkpoint_notes(cfg):
        console(stderr=True).print(f"[yellow]note:[/] {note}")
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
