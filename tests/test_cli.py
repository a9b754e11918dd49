"""End-to-end CLI on a tiny recipe (train -> sample -> eval -> compare), resume, and NaN handling."""

import json

import numpy as np
import pytest
import torch
from waiting import HANG_GUARD_S, wait_for

from onestep.cli import main
from onestep.config import load_config
from onestep.train.loop import Trainer, TrainingError
from onestep.utils.rundir import RunDir, load_checkpoint


def _params(path):
    return load_checkpoint(path)["model"]


def test_train_sample_eval_compare(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_recipe), "--run-dir", str(run), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run)  # last line: the run directory
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == ["step_000000006.pt", "step_000000012.pt"]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 12 and set(state) >= {"model", "ema", "optimizer", "config"}
    stats = [json.loads(l) for l in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [4, 8, 12] and all(np.isfinite(s["loss"]) for s in stats)
    assert list((run / "samples").glob("*.png"))

    assert main(["sample", str(run), "-n", "10", "--out", str(tmp_path / "s.npz")]) == 0
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (10, 2) and arr.dtype == np.float32
    assert main(["sample", str(run), "-n", "100", "--nfe", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0

    assert main(["eval", str(run), "--nfe", "1", "--nfe", "2", "--num-samples", "200"]) == 0
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert {(r["nfe"], r["metric"]) for r in rows} == {
        (n, m) for n in (1, 2) for m in ("sliced_wasserstein", "energy_distance", "checkerboard_outside")
    }
    assert all(r["num_samples"] == 200 and r["implementation"] and r["reference"] and r["step"] == 12 for r in rows)
    capsys.readouterr()
    assert main(["compare", str(run), "--format", "md"]) == 0
    table = capsys.readouterr().out
    assert "sliced_wasserstein@1" in table and "run" in table.splitlines()[0]


def test_refuses_to_overwrite_and_bad_input(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_recipe), "--run-dir", str(run), "--no-progress", "train.steps=2"]) == 0
    assert main(["train", str(tiny_recipe), "--run-dir", str(run), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", str(tiny_recipe), "train.stepz=3"]) == 2
    assert "unknown key 'stepz'" in capsys.readouterr().err
    assert main(["sample", str(run), "--out", str(tmp_path / "x.jpg")]) == 2
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "--out must end in .png or .npz" in err and "not found" in err


def test_resume_continues_the_same_run(tiny_recipe, tmp_path):
    straight, split = tmp_path / "a", tmp_path / "b"
    assert main(["train", str(tiny_recipe), "--run-dir", str(straight), "--no-progress"]) == 0
    assert main(["train", str(tiny_recipe), "--run-dir", str(split), "--no-progress", "train.steps=6"]) == 0
    assert load_checkpoint(split)["step"] == 6
    assert main(["train", "--resume", str(split), "--no-progress", "train.steps=12"]) == 0
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(load_config(tiny_recipe), run)
    real_loss = trainer.objective.loss

    def poisoned(net, x, y, *, step, feature_blocks=(), target_net=None):
        out = real_loss(net, x, y, step=step, feature_blocks=feature_blocks)
        if step == 8:
            out.loss = out.loss * float("nan")
        return out

    trainer.objective.loss = poisoned
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 8.*last good checkpoint kept"):
        trainer.run()
    kept = load_checkpoint(run)
    assert kept["step"] == 6
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


def test_a_stop_on_a_kept_step_keeps_its_numbered_checkpoint(tiny_recipe, tmp_path):
    """SIGTERM handled at the end of a step that train.keep_steps names writes that step's numbered
    checkpoint as well as last.pt (the resumed run starts after it and would never write it: a
    learning curve's point would be lost); a stop on another step writes last.pt only."""
    import signal

    from onestep.train.loop import TrainingInterrupted

    for stop_at, numbered in ((4, True), (3, False)):
        cfg = load_config(tiny_recipe, ["train.keep_steps=[4]", "train.checkpoint_every=0"])
        run = tmp_path / f"stop{stop_at}"
        trainer = Trainer(cfg, run)
        real_step = trainer.train_step

        def step_then_signal(step, real_step=real_step, trainer=trainer, stop_at=stop_at):
            logs = real_step(step)
            if step + 1 == stop_at:  # the signal arrives during this step: handled after it
                trainer._stop_signal = signal.SIGTERM
            return logs

        trainer.train_step = step_then_signal
        with pytest.raises(TrainingInterrupted):
            trainer.run()
        rd = RunDir(run)
        assert load_checkpoint(run)["step"] == stop_at
        assert rd.checkpoint_path(stop_at).is_file() == numbered, stop_at


def test_dry_run_prints_config_and_params(capsys):
    assert main(["train", "meanflow_b2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "name: dit_b_2" in out
    n = int(out.split("# backbone dit_b_2: ")[1].split(" parameters")[0].replace(",", ""))
    assert 129_500_000 < n < 132_500_000


def test_ls_and_validate(capsys):
    assert main(["ls", "backbones", "dit"]) == 0
    out = capsys.readouterr().out
    assert "dit_xl_2" in out and "mlp_toy" not in out
    assert main(["ls", "recipes"]) == 0
    assert "toy_meanflow" in capsys.readouterr().out
    assert main(["validate", "toy_meanflow", "train.steps=5"]) == 0
    assert main(["validate", "toy_meanflow", "objective.name=nope"]) == 2


def test_sigterm_saves_and_resume_is_bit_exact(tiny_recipe, tmp_path):
    """Kill a run with SIGTERM mid-way: it saves a checkpoint and exits 143; resuming it to N steps
    gives exactly the parameters of an uninterrupted N-step run."""
    import signal
    import subprocess
    import sys

    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "onestep",
        "train",
        str(tiny_recipe),
        "--run-dir",
        str(run),
        "--no-progress",
        "train.steps=1000000000",
        "train.log_every=1",
        "train.checkpoint_every=0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(RunDir(run).read_stats()) >= 5, proc, "5 stats rows")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM at step" in err and out.strip().splitlines()[-1] == str(run)
    stopped = load_checkpoint(run)["step"]
    assert 5 <= stopped < 1000000000
    total = stopped + 7
    assert main(["train", "--resume", str(run), "--no-progress", f"train.steps={total}"]) == 0
    straight = tmp_path / "straight"
    assert (
        main(
            [
                "train",
                str(tiny_recipe),
                "--run-dir",
                str(straight),
                "--no-progress",
                f"train.steps={total}",
                "train.checkpoint_every=0",
            ]
        )
        == 0
    )
    a, b = load_checkpoint(run), load_checkpoint(straight)
    assert a["step"] == b["step"] == total
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_corrupt_checkpoint_is_a_clear_error(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_recipe), "--run-dir", str(run), "--no-progress", "train.steps=2"]) == 0
    good = (run / "checkpoints" / "last.pt").read_bytes()
    (run / "checkpoints" / "last.pt").write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress", "train.steps=4"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.pt").read_bytes() == good[: len(good) // 2]  # nothing overwritten


def test_digits_conditional_train_sample_eval(tmp_path, capsys):
    recipe = tmp_path / "digits.yaml"
    recipe.write_text(
        "data: {name: digits}\n"
        "backbone: {name: test_dit}\n"
        "objective: {name: meanflow, cfg_omega: 1.0, cfg_kappa: 0.5}\n"
        "train: {steps: 4, batch_size: 16, lr: 0.001, log_every: 2, num_preview: 20}\n"
        "eval: {num_samples: 100, batch_size: 50}\n"
    )
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress"]) == 0
    assert main(["sample", str(run), "-n", "20", "--out", str(tmp_path / "d.npz")]) == 0
    z = np.load(tmp_path / "d.npz")
    assert z["arr_0"].shape == (20, 8, 8, 1) and z["arr_0"].dtype == np.uint8
    assert z["arr_1"].tolist() == [i % 10 for i in range(20)] and z["arr_1"].dtype == np.int64
    assert main(["sample", str(run), "-n", "5", "--class", "3", "--out", str(tmp_path / "c.npz")]) == 0
    assert np.load(tmp_path / "c.npz")["arr_1"].tolist() == [3] * 5
    assert main(["sample", str(run), "-n", "5", "--class", "10", "--out", str(tmp_path / "c.npz")]) == 2
    assert main(["eval", str(run), "--nfe", "1"]) == 0
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["metric"] for r in rows] == ["fd", "is", "acc", "precision", "recall"]
    assert rows[0]["value"] > 0 and 1 <= rows[1]["value"] <= 10 and all(0 <= r["value"] <= 1 for r in rows[2:])
    assert all("digits-CNN v1, test acc" in r["implementation"] and "sha256" in r["implementation"] for r in rows)
    assert rows[0]["reference"] == rows[3]["reference"] == "digits test split: all 359 images"


def test_plot_writes_pngs(tiny_recipe, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(tiny_recipe),
                "--run-dir",
                str(run),
                "--no-progress",
                "train.steps=4",
                "eval.every=2",
                "train.log_every=1",
            ]
        )
        == 0
    )
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [2, 4] and steps == sorted(steps)
    assert main(["plot", str(run)]) == 0
    for name in ("training.png", "metrics.png"):
        assert (run / "plots" / name).stat().st_size > 1000


def test_plot_panels_include_every_loss_term_and_the_feature_scale():
    from onestep.report.plot import training_panels

    stats = {
        "plain": [{"step": 10, "loss": 1.0, "loss_main": 1.0, "lr": 0.1, "images_per_s": 5.0}],
        "disp": [
            {"step": 10, "loss": 0.5, "loss_main": 1.0, "loss_dispersive": -1.0, "feature_rms_dispersive": 2.5},
            {"step": 20, "loss": 0.4, "loss_main": 0.9, "loss_dispersive": -1.0, "feature_rms_dispersive": 3.0},
        ],
    }
    panels = training_panels(stats)
    assert set(panels) == {"loss", "loss_main", "loss_dispersive", "feature_rms_dispersive", "lr"}
    assert panels["feature_rms_dispersive"] == {"plain": [], "disp": [(10, 2.5), (20, 3.0)]}


def test_plot_legend_names_every_run_in_one_colour_each(tmp_path):
    """The top panel's legend names lines that have no points there (a dispersive run's feature scale is
    the top panel; the plain run has none), a run keeps its colour in every panel and its settings
    (``metric_panels``) differ by dash."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onestep.report.plot import _stacked_plot

    figs = []

    class Keep:  # pyplot, except that figures stay open to be inspected
        def subplots(self, *a, **k):
            figs.append(plt.subplots(*a, **k))
            return figs[-1]

        def close(self, fig):
            pass

    panels = {
        "feature_rms_dispersive": {"plain": [], "disp": [(10, 2.5)]},
        "loss": {"plain": [(10, 1.0)], "disp": [(10, 0.5)]},
        "fd@1": {"other": [(10, 3.0)], ("disp", "2 000 samples"): [(10, 4.0)], ("disp", "10 000 samples"): [(10, 3.5)]},
    }
    _stacked_plot(Keep(), panels, tmp_path / "p.png")
    fig, axes = figs[0]
    legend = axes[0, 0].get_legend()
    names = ["plain", "disp", "other", "disp (2 000 samples)", "disp (10 000 samples)"]
    assert [t.get_text() for t in legend.get_texts()] == names
    colour, dash = {}, {}
    for ax in axes[:, 0]:
        for line in ax.get_lines():
            run = line.get_label().split(" (")[0]
            assert colour.setdefault(run, line.get_color()) == line.get_color()
            assert dash.setdefault(line.get_label(), line.get_linestyle()) == line.get_linestyle()
    assert colour["disp"] != colour["plain"] and colour["other"] not in (colour["disp"], colour["plain"])
    assert dash["disp (2 000 samples)"] != dash["disp (10 000 samples)"]
    assert (tmp_path / "p.png").stat().st_size > 1000
    plt.close(fig)


def test_metric_panels_split_a_run_by_evaluation_setting():
    """A learning curve on 2 000 samples and the end on 10 000, or guided beside unguided passes, are
    separate lines (not one zig-zag), named alike in every panel; a run with one setting is one line."""
    from onestep.report.plot import metric_panels

    def row(step, nfe, value, n=2000, guidance=None, metric="fd"):
        return {"step": step, "nfe": nfe, "metric": metric, "value": value, "num_samples": n,
                "guidance": guidance, "sampler": "euler", "weights": "ema", "seed": 0}  # fmt: skip

    metrics = {
        "curve": [
            row(10, 1, 9.0),
            row(20, 1, 5.0),
            row(20, 1, 4.0, n=10000),
            row(10, 2, 7.0),
            row(20, 2, 3.0, n=10000),
        ],
        "fm": [
            row(20, 1, 50.0, n=10000),
            row(20, 10, 8.0, n=10000, guidance=2.0),
            row(20, 50, 6.0, n=10000, guidance=2.0),
        ],
        "one": [row(10, 1, 8.0), row(20, 1, 6.0)],
    }
    panels = metric_panels(metrics)
    assert set(panels) == {"fd@1", "fd@2", "fd@10", "fd@50"}
    assert panels["fd@1"] == {
        ("curve", "2 000 samples"): [(10, 9.0), (20, 5.0)],
        ("curve", "10 000 samples"): [(20, 4.0)],
        ("fm", "unguided"): [(20, 50.0)],
        "one": [(10, 8.0), (20, 6.0)],
    }
    assert panels["fd@2"][("curve", "10 000 samples")] == [(20, 3.0)]
    assert panels["fd@50"] == {("fm", "ω=2"): [(20, 6.0)], "one": []}


def test_keep_checkpoints_retention(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(tiny_recipe),
                "--run-dir",
                str(run),
                "--no-progress",
                "train.steps=8",
                "train.checkpoint_every=2",
                "train.keep_checkpoints=2",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == ["step_000000006.pt", "step_000000008.pt"]
    assert load_checkpoint(run)["step"] == 8
