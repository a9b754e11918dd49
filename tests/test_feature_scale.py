"""tools/feature_scale.py: the block-feature scale of every numbered checkpoint of a run, on one batch."""

import csv
import importlib.util
import math
from pathlib import Path

import torch

from onestep.cli import main

TOOL = Path(__file__).resolve().parent.parent / "tools" / "feature_scale.py"


def _tool():
    spec = importlib.util.spec_from_file_location("feature_scale", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_per_checkpoint_and_the_same_batch_for_every_run(tiny_recipe, tmp_path, one_thread):
    a, b = tmp_path / "a", tmp_path / "b"
    for run, seed in ((a, 3), (b, 4)):
        assert main(["train", str(tiny_recipe), "--run-dir", str(run), "--no-progress", f"seed={seed}"]) == 0
    tool = _tool()
    out = tmp_path / "scale.csv"
    png = tmp_path / "scale.png"
    assert tool.main([str(a), str(b), "--batch", "32", "--csv", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out)))
    assert [(r["run"], r["step"]) for r in rows] == [("a", "6"), ("a", "12"), ("b", "6"), ("b", "12")]
    for r in rows:
        assert float(r["feature_rms"]) > 0 and float(r["floor"]) == -math.log(32)
        assert float(r["floor"]) - 1e-9 <= float(r["infonce_l2"]) <= 1e-9
    # The RMS is that of the block's tokens on the tool's batch (recomputed here by hand).
    run = tool.load_run(_checkpoint(a, 12))
    z, t, y = tool.fixed_batch(run, 32, 0)
    with torch.no_grad():
        _, (feats,) = run.net.forward_features(z, t, torch.zeros_like(t), y, blocks=[run.net.encoder_blocks[0]])
    assert float(rows[1]["feature_rms"]) == float(f"{float(feats.double().square().mean().sqrt()):.17g}")


def _checkpoint(run, step):
    from onestep.utils.rundir import RunDir

    return RunDir(run).checkpoint_path(step)
