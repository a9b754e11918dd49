"""The whole ``onestep`` argument parser: every subcommand, its options and help text, in one place."""

from __future__ import annotations

import argparse

EPILOG = "Docs: README.md. Recipes: `onestep ls recipes`."


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


def _command(name: str):
    """The subcommand ``name``: ``onestep.cli.<name>.run``, imported only when it runs (a quick --help)."""

    def run(args) -> int:
        import importlib

        return importlib.import_module(f"onestep.cli.{name}").run(args)

    return run


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
    t.set_defaults(fn=_command("train"))

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
    s.set_defaults(fn=_command("sample"))

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
    e.set_defaults(fn=_command("eval"))

    x = sub.add_parser("export", help="write a run's model as DIR/{model.safetensors, config.yaml, README.md}")
    x.add_argument("run", metavar="RUN_DIR|CKPT")
    x.add_argument("--out", required=True, metavar="DIR", help="the export directory (refused if not empty)")
    x.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    x.add_argument("--force", action="store_true", help="overwrite the files of a non-empty DIR")
    x.set_defaults(fn=_command("export"))

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
    c.add_argument(
        "--env", action="store_true", help="add where each run trained: onestep commit, torch, device (onestep env)"
    )
    c.set_defaults(fn=_command("compare"))

    su = sub.add_parser("suite", help="train and score a list of recipes into one results table (resumable)")
    su.add_argument(
        "items",
        nargs="+",
        metavar="SUITE.yaml|RECIPE|KEY=VALUE",
        help="a suite file (recipes/suites/*.yaml) or recipes; KEY=VALUE overrides apply to every run",
    )
    su.add_argument("--jobs", type=_positive_int, default=1, help="commands at once (each gets cores/N threads)")
    su.add_argument(
        "--threads",
        type=_positive_int,
        help="threads per command (default cores/jobs; e.g. 1 beside another suite on the same machine)",
    )
    su.add_argument("--root", help="folder of the run directories (default: the suite's root)")
    su.add_argument("--only", help="comma-separated run names (and what they depend on)")
    su.add_argument("--report-only", action="store_true", help="rewrite the tables and figures; train nothing")
    su.set_defaults(fn=_command("suite"))

    pl = sub.add_parser("plot", help="PNG training curves and metric-vs-step plots (needs matplotlib)")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", help="output folder (default RUN/plots, or ./plots for several runs)")
    pl.set_defaults(fn=_command("plot"))

    ls = sub.add_parser("ls", help="list registered components or recipes")
    ls.add_argument("kind", nargs="?", help="backbones|objectives|regularizers|datasets|metrics|formats|recipes")
    ls.add_argument("pattern", nargs="?")
    ls.add_argument("--all", action="store_true", help="include the tiny test_* components")
    ls.set_defaults(fn=_command("ls"))

    v = sub.add_parser("validate", help="check a recipe (and overrides) without building anything big")
    v.add_argument("items", nargs="+", metavar="RECIPE [KEY=VALUE ...]")
    v.set_defaults(fn=_command("validate"))

    en = sub.add_parser("env", help="versions, devices and thread settings (paste into a bug report)")
    en.add_argument("--json", action="store_true", help="one JSON object instead of '- key: value' lines")
    en.set_defaults(fn=_command("env"))
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
        "--sampler",
        choices=["euler", "restart"],
        help="flow maps (meanflow, dmf): Euler flow-map steps or the restart sampler (jump to the data, "
        "re-noise; default: the run's objective.sampler)",
    )
    p.add_argument(
        "--vae",
        default=None,
        help="decode latents with this VAE (Hugging Face id or local directory; default data.vae of the run)",
    )
