"""onestep suite: dependencies, resumability, the results table and the figures, on tiny recipes over
tiny Fashion-MNIST files (the real IDX layout) with the toolkit's Fashion classifier."""

from __future__ import annotations

import csv
import json

import pytest
from fashion_files import write_fashion

from onestep.cli import main
from onestep.utils.rundir import RunDir, load_checkpoint

BASE = """
seed: 0
data: {name: fashion_mnist, root: ROOT, conditional: true}
backbone: {name: dit, patch_size: 7, depth: 1, hidden_size: 32, num_heads: 2, time_scale: 1.0}
objective: {name: flow_matching, class_dropout: 0.1}
train: {steps: 6, batch_size: 16, lr: 0.001, log_every: 2, checkpoint_every: 2, num_preview: 10}
eval: {nfe: [1], num_samples: 40, batch_size: 40}
"""


@pytest.fixture
def tiny_suite(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from onestep.eval.classifiers import base

    monkeypatch.setattr(base, "_LOADED", {})
    # The synthetic bars need a classifier trained on them, not the shipped Fashion-MNIST one.
    monkeypatch.setattr(base, "SHIPPED_DIR", tmp_path / "no-shipped-classifiers")
    write_fashion(tmp_path / "data")
    (tmp_path / "fm.yaml").write_text(BASE.replace("ROOT", str(tmp_path / "data")))
    (tmp_path / "mf.yaml").write_text("base: fm.yaml\nobjective: {name: meanflow, ratio_r_neq_t: 0.5}\n")
    (tmp_path / "cd.yaml").write_text(
        "base: fm.yaml\nobjective: {name: consistency_distillation, teacher: none, num_scales: 4}\ntrain: {steps: 4}\n"
    )
    root = tmp_path / "runs"
    (tmp_path / "suite.yaml").write_text(f"""
root: {root}
eval: {{num_samples: 40, seed: 0, metrics: [fd, is, acc, precision, recall]}}
real: [train]
runs:
  - {{name: fm, recipe: {tmp_path}/fm.yaml, label: flow matching, evals: [{{nfe: [1]}}, {{nfe: [4], late: true}}],
     grid: {{nfe: 4}}}}
  - {{name: cd, recipe: {tmp_path}/cd.yaml, label: CD, overrides: ["objective.teacher={{root}}/fm"]}}
  - {{name: mf, recipe: {tmp_path}/mf.yaml, label: MeanFlow, seeds: mf}}
  - {{name: mf_s1, recipe: {tmp_path}/mf.yaml, label: MeanFlow, overrides: [seed=1], seeds: mf}}
""")
    return tmp_path, root


def _table(root):
    with open(root / "results.csv") as f:
        return list(csv.DictReader(f))


def test_suite_trains_scores_resumes_and_writes_the_table(tiny_suite, capfd):
    tmp_path, root = tiny_suite
    assert main(["suite", str(tmp_path / "suite.yaml"), "--jobs", "2"]) == 0
    err = capfd.readouterr().err
    rows = _table(root)
    by = {(r["run"], r["nfe"]): r for r in rows}
    assert set(by) >= {("fm", "1"), ("fm", "4"), ("cd", "1"), ("mf", "1"), ("mf_s1", "1")}
    for r in rows[:-1]:
        assert float(r["fd"]) > 0 and 1 <= float(r["is"]) <= 10 and 0 <= float(r["acc"]) <= 1
        assert 0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1 and r["status"] == "trained"
        assert float(r["train_min"]) >= 0 and int(r["params"]) > 0
    real = rows[-1]
    assert real["method"] == "real images (real:train)" and float(real["acc"]) >= 0.9
    # The teacher trained before its student started (the dependency), each once.
    assert err.index("fm: train done") < err.index("cd: train started")
    md = (root / "results.md").read_text()
    assert "| flow matching | 4 |" in md and "real images (train split)" in md and "fashion_mnist-CNN v1" in md
    from PIL import Image

    assert "| mf | mf, mf_s1 |" in md  # the seeds group's mean ± std
    # The two seeds share a label: each row names its run; a label of one run stands alone.
    assert "| MeanFlow (mf) | 1 |" in md and "| MeanFlow (mf_s1) | 1 |" in md and "| CD | 1 |" in md
    assert Image.open(root / "seeds.png").size[0] > 0  # and its figure: each seed, mean ± std
    for name in ("fm", "cd", "mf", "mf_s1"):
        assert (root / "grids" / f"{name}.png").is_file()

    grid = Image.open(root / "grid.png")
    assert grid.size[1] > 3 * 28  # one row per method (fm, cd, mf; mf_s1 shares mf's row)

    # A second run trains and evaluates nothing again.
    assert main(["suite", str(tmp_path / "suite.yaml")]) == 0
    again = capfd.readouterr().err
    assert "started" not in again and _table(root) == rows

    # A cut run (its last checkpoint before train.steps) is resumed, not restarted.
    run = RunDir(root / "mf")
    ckpt = load_checkpoint(run.path)
    import torch

    step2 = run.checkpoint_path(2)
    torch.save(torch.load(step2, weights_only=True), run.last_checkpoint)
    run.truncate_stats(2)
    assert main(["suite", str(tmp_path / "suite.yaml"), "--report-only"]) == 0
    status = {r["run"]: r["status"] for r in _table(root) if r["run"]}
    assert status["mf"] == "at step 2 of 6" and status["fm"] == "trained"  # a cut run is not a result
    assert main(["suite", str(tmp_path / "suite.yaml"), "--only", "mf"]) == 0
    err = capfd.readouterr().err
    assert "mf: train started (onestep train --resume" in err and load_checkpoint(run.path)["step"] == ckpt["step"]
    assert "fm: " not in err and "1 of 1 runs trained" in err  # --only trains and scores mf alone...
    scores = [(r["run"], r["nfe"], r["fd"]) for r in rows]
    assert [(r["run"], r["nfe"], r["fd"]) for r in _table(root)] == scores  # ...the tables cover every run
    assert "| flow matching | 4 |" in (root / "results.md").read_text()


def test_suite_refuses_bad_files(tmp_path, capsys):
    bad = tmp_path / "s.yaml"
    bad.write_text("runs: [{recipe: toy_meanflow, colour: red}]\n")
    assert main(["suite", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key(s) colour" in err
    bad.write_text("runs: [{name: a, recipe: toy_meanflow, after: [b]}]\n")
    assert main(["suite", str(bad)]) == 2
    assert "waits for unknown run(s) b" in capsys.readouterr().err


def test_seeds_table_mean_std_and_single_run():
    from onestep.suite import seeds_table

    rows = [
        {"run": "a", "nfe": 1, "fd": 10.0, "precision": 0.5, "acc": 0.8, "recall": 0.2},
        {"run": "a1", "nfe": 1, "fd": 14.0, "precision": 0.7, "acc": 0.9, "recall": 0.4},
        {"run": "a", "nfe": 2, "fd": 99.0, "precision": 0.1, "acc": 0.1, "recall": 0.1},  # not 1 NFE: left out
        {"run": "b", "nfe": 1, "fd": 20.0, "precision": 0.6, "acc": 0.7, "recall": 0.3},
    ]
    md = seeds_table(rows, {"a": "A", "a1": "A", "b": "B"})
    assert "| A | a, a1 | 12.000 ± 2.828 | 0.850 ± 0.071 | 0.600 ± 0.141 | 0.300 ± 0.141 |" in md
    assert "| B | b | 20.000 (1 run) | 0.700 (1 run) | 0.600 (1 run) | 0.300 (1 run) |" in md
    assert "± 0.000" not in md and "Welch" not in md  # one run in B: no test
    rows.append({"run": "b1", "nfe": 1, "fd": 22.0, "precision": 0.6, "acc": 0.6, "recall": 0.3})
    md = seeds_table(rows, {"a": "A", "a1": "A", "b": "B", "b1": "B"})
    from scipy import stats

    p = stats.ttest_ind([20.0, 22.0], [10.0, 14.0], equal_var=False).pvalue
    assert f"| B − A | +9.000 (p={p:.2g})" in md and "Welch" in md

    from onestep.suite.report import seed_groups, seeds_panel_title

    groups = seed_groups(rows, {"a": "A", "a1": "A", "b": "B", "b1": "B"})
    assert [r["run"] for r in groups["A"]] == ["a", "a1"]  # the 2-NFE row of a is not a seed
    assert seeds_panel_title(groups, "fd") == f"FD (1 NFE)\nB vs A: Welch p = {p:.2g}"
    assert seeds_panel_title({"A": groups["A"]}, "acc") == "class accuracy (1 NFE)"  # one group: no test


def test_suite_grid_false_leaves_the_run_out_of_the_figure(tmp_path, capsys):
    from onestep.suite import load_suite

    s = tmp_path / "s.yaml"
    s.write_text(
        "runs:\n  - {name: a, recipe: toy_meanflow}\n  - {name: b, recipe: toy_meanflow, grid: false}\n"
        "  - {name: c, recipe: toy_meanflow, grid: {nfe: 2}}\n"
    )
    runs = {r.name: r for r in load_suite([str(s)]).runs}
    assert [runs[n].in_figure for n in "abc"] == [True, False, True]
    assert runs["c"].grid.nfe == [2] and runs["b"].grid.nfe == runs["a"].grid.nfe
    s.write_text("runs: [{name: a, recipe: toy_meanflow, grid: yes please}]\n")
    assert main(["suite", str(s)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "grid: a mapping" in err


def test_the_shipped_fashion_suite_loads_with_its_dependencies():
    """recipes/suites/fashion.yaml: every recipe resolves and validates, names are unique, the runs that
    start from or distill flow matching wait for it, and the seed groups pair both dispersive arms."""
    from pathlib import Path

    from onestep.config import REPO_RECIPES
    from onestep.suite import load_suite

    suite = load_suite([str(REPO_RECIPES / "suites" / "fashion.yaml")], overrides=["data.root=DIR"])
    runs = {r.name: r for r in suite.runs}
    assert len(runs) == len(suite.runs) and suite.root == Path("runs/fashion")
    for name in ("ect", "sct", "cd", "scd", "meanflow_distill", "dmf"):
        assert runs[name].after == ["flow_matching"], name
    assert runs["dmf"].cfg.backbone["decoupled_depth"] == 4
    assert [(e.nfe, e.sampler) for e in runs["dmf"].evals] == [([1, 2, 4], None), ([2], "restart")]
    assert runs["alphaflow"].cfg.objective["alpha_steps"] == [0, runs["alphaflow"].steps]
    assert all(r.cfg.data["root"] == "DIR" and r.cfg.data["name"] == "fashion_mnist" for r in suite.runs)
    groups = {r.seeds for r in suite.runs if r.seeds}
    assert groups == {"meanflow_1400", "meanflow_disp_1400"}
    assert sum(r.seeds == "meanflow_1400" for r in suite.runs) == 3
    assert runs["meanflow_disp_cosine"].cfg.regularizers[0]["variant"] == "infonce_cosine"
    fm = [(e.nfe, e.guidance) for e in runs["flow_matching"].evals]
    assert ([50], 2.0) in fm and ([50], None) in fm


def test_curves_keep_their_checkpoints_score_once_and_draw(tiny_suite, capfd):
    """A suite ``curve``: the kept checkpoints at its steps (``train.keep_steps``, never rotated away),
    scored on the curve's sample count (and the full count at ``full`` steps), the table and figure;
    a second run scores nothing again."""
    tmp_path, root = tiny_suite
    (tmp_path / "curves.yaml").write_text(f"""
root: {root}
eval: {{num_samples: 40, seed: 0, metrics: [fd, is, acc, precision, recall]}}
curve: {{points: [0.5, 1.0], num_samples: 20, full: [0.5], budget_minutes: 10}}
runs:
  - {{name: fm, recipe: {tmp_path}/fm.yaml, label: flow matching, overrides: [train.keep_checkpoints=1],
     evals: [{{nfe: [1]}}, {{nfe: [4], late: true, yardstick: true}}], curve: {{evals: [{{nfe: [2]}}]}}}}
  - {{name: mf, recipe: {tmp_path}/mf.yaml, label: MeanFlow}}
""")
    assert main(["suite", str(tmp_path / "curves.yaml")]) == 0
    capfd.readouterr()
    # keep_checkpoints=1 rotates the numbered checkpoints (2 goes), but not the curve's steps 3 and 6.
    kept = sorted(p.name for p in (root / "fm" / "checkpoints").glob("step_*.pt"))
    assert kept == ["step_000000003.pt", "step_000000004.pt", "step_000000006.pt"]
    with open(root / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    by = {(r["run"], r["step"], r["nfe"], r["num_samples"]) for r in rows}
    assert by == {
        ("fm", "3", "2", "20"),
        ("fm", "6", "2", "20"),
        ("fm", "3", "2", "40"),  # the ``full`` point
        ("mf", "3", "1", "20"),
        ("mf", "6", "1", "20"),
        ("mf", "3", "1", "40"),
        # the last step's own passes on the full count
        ("fm", "6", "1", "40"),
        ("fm", "6", "4", "40"),
        ("mf", "6", "1", "40"),
    }
    assert {r["budget_min"] for r in rows if r["step"] == "3"} == {"5.0"}
    assert all(float(r["fd"]) > 0 and float(r["train_min"]) >= 0 and r["schedule"] == "" for r in rows)
    assert (root / "curves.png").stat().st_size > 0 and "| MeanFlow | 3 | 5 |" in (root / "curves.md").read_text()
    # suite.jsonl: the invocation's start and end around every command's start and end, dated.
    events = [json.loads(line) for line in (root / "suite.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[0]["runs"] == ["fm", "mf"] and events[-1]["event"] == "end"
    commands = [(e["run"], e["what"], e["status"]) for e in events if e["event"] == "command"]
    assert commands.count(("fm", "train", "started")) == 1 and commands.count(("fm", "train", "done")) == 1
    assert sum(c[2] == "started" for c in commands) == sum(c[2] == "done" for c in commands) >= 4
    assert (
        "Suite wall time: " in (root / "results.md").read_text()
        and "over 1 invocation since" in (root / "results.md").read_text()
    )
    assert main(["suite", str(tmp_path / "curves.yaml")]) == 0
    assert "started" not in capfd.readouterr().err  # nothing trained or scored again
    assert "over 2 invocations since" in (root / "results.md").read_text()
    # compare shows the last step's full scoring (40 samples), not the curve's 20 written after it.
    full = next(r for r in rows if (r["run"], r["step"], r["nfe"], r["num_samples"]) == ("mf", "6", "1", "40"))
    assert main(["compare", str(root / "mf"), "--format", "csv"]) == 0
    header, line = capfd.readouterr().out.strip().splitlines()[:2]
    assert dict(zip(header.split(","), line.split(",")))["fd@1"] == f"{float(full['fd']):.4g}"


def test_scoring_during_training_leaves_the_weights_alone(tiny_recipe, tmp_path):
    """Curve checkpoints (train.keep_steps) and in-loop evaluation (eval.every) change nothing that
    training computes: the same weights and EMA as a plain run."""
    import torch

    plain, scored = tmp_path / "plain", tmp_path / "scored"
    assert main(["train", str(tiny_recipe), "--run-dir", str(plain), "--no-progress"]) == 0
    assert (
        main(
            [
                "train",
                str(tiny_recipe),
                "--run-dir",
                str(scored),
                "--no-progress",
                "train.keep_steps=[3,5]",
                "eval.every=4",
                "eval.num_samples=64",
            ]
        )
        == 0
    )
    assert RunDir(scored).checkpoint_path(3).is_file() and RunDir(scored).checkpoint_path(5).is_file()
    assert any(r["step"] == 4 for r in RunDir(scored).read_metrics())
    a, b = load_checkpoint(plain), load_checkpoint(scored)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_a_toy_suite_goes_through_to_its_tables_and_figures(tmp_path, capfd, monkeypatch):
    """Recipes given directly, 2-D data: the suite trains, scores with the data's own metrics and
    draws density pictures (not image grids)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "toy"
    args = ["suite", "toy_meanflow", "toy_flow_matching", "train.steps=20", "eval.num_samples=500", "--root", str(root)]
    assert main([*args, "--threads", "1"]) == 0
    err = capfd.readouterr().err
    assert err.count("train.threads=1") == 2 and "OMP" not in err  # --threads reaches every command
    md = (root / "results.md").read_text()
    assert "sliced_wasserstein" in md and "| toy_meanflow | 1 |" in md
    from PIL import Image

    grid = Image.open(root / "grid.png")
    assert grid.size[1] >= 2 * 100  # one density picture per run
    assert (root / "grids" / "toy_meanflow.png").is_file()


def test_suite_bad_input_is_one_line(tmp_path, capfd):
    cases = {
        "runs: [{recipe: toy_meanflow\n": "not valid YAML at line",
        "runs: [{recipe: toy_meanflow, overrides: [train.stepz=3]}]\n": "(toy_meanflow): train: unknown key 'stepz'",
        "runs: [{recipe: no_such_recipe}]\n": "runs[0] (no_such_recipe)",
        "runs: [{recipe: toy_cd, overrides: [objective.teacher=/nowhere/run]}]\n": "objective.teacher '/nowhere/run'",
        "runs: [{recipe: toy_meanflow, evals: [{nfe: [0]}]}]\n": "evals[0].nfe: a list of whole numbers",
        "runs: [{recipe: toy_meanflow}]\ncurve: {points: [2]}\n": "curve.points: fractions of train.steps",
        "runs: [{recipe: toy_meanflow}]\ncurve: {points: [0.5], colour: red}\n": "unknown key(s) colour",
        "runs: [{recipe: toy_meanflow}]\nreal: [validation]\n": "'real' is a list of splits",
    }
    for i, (text, needle) in enumerate(cases.items()):
        path = tmp_path / f"s{i}.yaml"
        path.write_text(text)
        assert main(["suite", str(path)]) == 2, text
        err = capfd.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, (text, err)
    assert main(["suite", str(tmp_path / "missing.yaml")]) == 2
    assert "no such suite file" in capfd.readouterr().err


def test_a_failing_run_is_reported_with_its_cause(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "s.yaml").write_text(
        f"root: {tmp_path / 'runs'}\nruns:\n  - {{name: fm, recipe: fashion_flow_matching, "
        f"overrides: [data.root={tmp_path / 'no-data'}, train.steps=2]}}\n"
    )
    assert main(["suite", str(tmp_path / "s.yaml")]) == 1
    err = capfd.readouterr().err
    cause = [line for line in err.splitlines() if line.startswith("[suite] fm: failed:")]
    assert cause and "onestep train: error:" in cause[0] and "no-data" in cause[0], err


def test_the_shipped_1h_dispersive_ablation_and_gpu_suites_load():
    """recipes/suites/fashion_1h.yaml, fashion_dispersive.yaml, fashion_alphaflow_ablation.yaml and
    fashion_gpu.yaml: every run resolves,
    the runs that start from or distil flow matching wait for it, each 1-hour run has 4x the steps of
    its 15-minute recipe and a curve whose 1/4 point (15 minutes) is also scored on the full count."""
    from onestep.config import REPO_RECIPES, find_recipe, load_yaml
    from onestep.suite import load_suite

    suites = REPO_RECIPES / "suites"
    hour = {r.name: r for r in load_suite([str(suites / "fashion_1h.yaml")], overrides=["data.root=DIR"]).runs}
    for name in ("ect", "sct", "scd", "meanflow_distill", "dmf"):
        assert hour[name].after == ["flow_matching"], name
    for name, run in hour.items():
        base = load_config_steps(find_recipe(run.recipe), load_yaml)
        assert run.steps == 4 * base or name == "alphaflow" and run.steps == 3790, name
        assert run.curve.full_steps == [round(run.steps / 4)] and run.curve.steps[-1] == run.steps, name
        assert run.curve.budget_minutes == 60
    assert hour["alphaflow"].cfg.objective["alpha_steps"] == [0, 3790]
    # Its curriculum ends at its last step: its earlier points are mid-curriculum, marked as such; every
    # other 1-hour run's schedules are in absolute steps (its points are the runs that stopped there).
    assert "alpha_steps" in hour["alphaflow"].curve.schedule
    assert all(not run.curve.schedule for name, run in hour.items() if name != "alphaflow")
    assert [e.nfe for e in hour["flow_matching"].curve.evals] == [[10]]
    for name in ("dmf", "alphaflow"):  # the restart sampler at 2 NFE at the end, Euler along the curve
        assert ([2], "restart") in [(e.nfe, e.sampler) for e in hour[name].evals], name
        assert all(e.sampler is None for e in hour[name].curve.evals), name
    sweep = load_suite([str(suites / "fashion_dispersive.yaml")], overrides=["data.root=DIR"]).runs
    assert len(sweep) == 10 and all(r.steps == 900 and r.curve is None for r in sweep)
    # The alpha-Flow ablation: MeanFlow's 900 steps (15 minutes) and 3600 (1 hour, with the 1-hour curve);
    # the alpha0 runs keep alpha = 0 at every step.
    ablation = {
        r.name: r
        for r in load_suite([str(suites / "fashion_alphaflow_ablation.yaml")], overrides=["data.root=DIR"]).runs
    }
    assert {name: r.steps for name, r in ablation.items()} == {"alpha0": 900, "ratio75": 900, "alpha0_1h": 3600}
    from onestep.objectives.meanflow import alpha_schedule

    for name in ("alpha0", "alpha0_1h"):
        o = ablation[name].cfg.objective
        args = (o["alpha_start"], o["alpha_end"], *o["alpha_steps"], o["alpha_gamma"], o["alpha_clamp"])
        assert all(alpha_schedule(k, *args) == 0 for k in (0, 450, 900, 3600)), name
    assert ablation["alpha0_1h"].curve.steps == hour["meanflow"].curve.steps
    assert ablation["alpha0_1h"].curve.full_steps == [900] and not ablation["alpha0_1h"].curve.schedule
    assert ablation["ratio75"].cfg.objective["ratio_r_neq_t"] == 0.75
    gpu = {r.name: r for r in load_suite([str(suites / "fashion_gpu.yaml")], overrides=["data.root=DIR"]).runs}
    assert set(gpu) == set(hour)  # every run, the dispersive arms' three seeds included
    assert {n: (r.cfg.seed, r.seeds) for n, r in gpu.items() if r.seeds} == {
        n: (r.cfg.seed, r.seeds) for n, r in hour.items() if r.seeds
    }
    for name, run in gpu.items():  # 10x the images of the 1-hour run: batch 4x, steps 2.5x
        assert run.cfg.train.batch_size == 256 and run.cfg.train.precision == "bf16", name
        assert run.steps * 256 == 10 * hour[name].steps * 64, name


def load_config_steps(path, load_yaml):
    """train.steps of a recipe file, following its ``base``."""
    from onestep.config import from_dict

    return from_dict(load_yaml(path)).train.steps


def test_a_latent_suite_goes_through_to_its_tables_and_figures(tmp_path, capfd, monkeypatch):
    """SD-VAE-style latents without a VAE: scored with the latent data's own metrics, drawn as the
    rough first-three-channel preview (a run with a VAE decodes instead)."""
    import numpy as np

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "latents"
    root.mkdir()
    rng = np.random.default_rng(0)
    np.savez(
        root / "shard_0.npz",
        latents=rng.standard_normal((32, 4, 8, 8)).astype(np.float32),
        labels=np.arange(32) % 4,
    )
    (tmp_path / "lat.yaml").write_text(
        f"data: {{name: latents, root: {root}, num_classes: 4}}\nbackbone: {{name: test_dit}}\n"
        "objective: {name: meanflow}\n"
        "train: {steps: 2, batch_size: 8, lr: 0.001, log_every: 1, num_preview: 4, checkpoint_every: 0}\n"
        "eval: {nfe: [1], num_samples: 32, batch_size: 32}\n"
    )
    out = tmp_path / "suite"
    assert main(["suite", str(tmp_path / "lat.yaml"), "--root", str(out)]) == 0
    capfd.readouterr()
    md = (out / "results.md").read_text()
    assert "| lat | 1 |" in md and "—" not in md.splitlines()[2].split("|")[4]  # a metric value
    assert (out / "grid.png").is_file() and (out / "grids" / "lat.png").is_file()


def test_a_signal_stops_the_suite_and_its_commands(tmp_path):
    """SIGTERM to the suite reaches the training it runs (which saves a checkpoint and exits), no
    further command starts, the suite exits 143, and nothing is left running on the run directory."""
    import os
    import signal
    import subprocess
    import sys

    from waiting import HANG_GUARD_S, wait_for

    from onestep.utils.rundir import _alive

    root = tmp_path / "toy"
    cmd = [sys.executable, "-m", "onestep", "suite", "toy_meanflow", "toy_flow_matching", "--root", str(root)]
    cmd += ["train.steps=1000000", "train.log_every=1", "--jobs", "1", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = RunDir(root / "toy_meanflow")
    trainer = None
    try:
        wait_for(lambda: run.read_stats(), proc, "the first training row")  # the training loop is running
        trainer = int((run.path / RunDir.LOCK).read_text())
        assert trainer not in (os.getpid(), proc.pid)  # the lock is the training command's
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert "[suite] stopped by SIGTERM" in err and "toy_flow_matching: train started" not in err
        assert "toy_meanflow: train stopped by SIGTERM" in err and "FAILED" not in err
        assert not _alive(trainer) and not (run.path / RunDir.LOCK).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        if trainer is not None and _alive(trainer):  # an orphan left by a failing suite
            os.kill(trainer, signal.SIGKILL)
    assert load_checkpoint(run.path)["step"] >= 1  # the training saved where it stopped: resumable


def test_grid_labels_draw_greek_letters_or_spell_them():
    """ "α-Flow" in a grid's label is drawn as α (not the font's missing-glyph box), or spelled out
    where only a Latin font is at hand."""
    from onestep.suite.grids import label_font, latin_label

    assert latin_label("α-Flow (ω 2)") == "alpha-Flow (omega 2)" and latin_label("Décor") == "Décor"
    font, unicode = label_font()
    assert unicode  # matplotlib (a dev dependency) brings DejaVu Sans

    def glyph(c):
        mask = font.getmask(c)
        return mask.size, bytes(mask)

    assert glyph("α") != glyph("\ue000")  # a private-use code point: drawn as the missing-glyph box


def test_curve_standings_name_the_leader_per_point_and_how_each_curve_ends():
    """curves.md's reading of the curves: per budget point the best 1-NFE value (seeds of one label
    averaged, mid-schedule points left out, accuracy ranked the other way), and each curve's last move."""
    from types import SimpleNamespace

    from onestep.suite.curves import budget_tables, standings
    from onestep.suite.spec import EvalPass

    def run(name, label, schedule="", guidance=None, seeds=None):
        curve = SimpleNamespace(num_samples=100, schedule=schedule, evals=[EvalPass(nfe=[1], guidance=guidance)])
        return SimpleNamespace(name=name, label=label, curve=curve, cfg=SimpleNamespace(objective={}), seeds=seeds)

    # a, a1: two seeds of one group; d: a one-call model with a guidance input (iMF): its first pass
    # is guided and still one step; e: another run under A's label but no seed of it (not averaged in).
    runs = [run("a", "A", seeds="g"), run("a1", "A", seeds="g"), run("b", "B"), run("c", "C", "curriculum")]
    runs += [run("d", "D", guidance=2.0), run("e", "A")]
    suite = SimpleNamespace(runs=runs)
    higher = {"fd": False, "acc": True}

    def row(name, label, step, fd, acc, schedule="", nfe=1, guidance=None, num=100):
        return {
            "run": name,
            "method": label,
            "step": step,
            "budget_min": step / 10,
            "nfe": nfe,
            "guidance": guidance,
            "sampler": "euler",
            "num_samples": num,
            "fd": fd,
            "acc": acc,
            "schedule": schedule,
            "_higher": higher,
        }

    rows = [
        row("a", "A", 150, 50.0, 0.70),
        row("a1", "A", 150, 70.0, 0.72),
        row("b", "B", 150, 55.0, 0.80),
        row("c", "C", 150, 10.0, 0.99, schedule="curriculum"),  # mid-curriculum: does not compete
        row("b", "B", 150, 1.0, 0.99, num=1000),  # the full count is not the curve's
        row("b", "B", 150, 2.0, 0.99, nfe=2),
        row("b", "B", 150, 3.0, 0.99, guidance=2.0),
        row("a", "A", 600, 40.0, 0.90),
        row("a1", "A", 600, 42.0, 0.92),
        row("b", "B", 600, 58.0, 0.95),
        row("c", "C", 600, 20.0, 0.93),
        row("d", "D", 600, 30.0, 0.5, guidance=2.0),
        row("e", "A", 150, 99.0, 0.1),
    ]
    text = "\n".join(standings(suite, rows, ["fd", "is", "acc"]))
    assert "| 15 | B 55 (A (mean of 2) 60) | B 0.8 (A (mean of 2) 0.71) |" in text
    assert "| 60 | C 20 (D 30) | B 0.95 (C 0.93) |" in text
    assert "Left out before their last step (mid-schedule, marked \\*): C." in text
    assert "| B (b) | 15 → 60 | 55 → 58 | +5 % (not improving) |" in text
    assert "| A (a) | 15 → 60 | 50 → 40 | -20 % (still improving) |" in text
    assert "| C (c) | 15 → 60 | 10 → 20 | +100 % (not improving), from a mid-schedule point \\* |" in text
    assert standings(suite, [r for r in rows if r["nfe"] == 2], ["fd", "acc"]) == []

    # The tables at the points scored on the full count: the 1000-sample row alone, at its minutes.
    tables = "\n".join(budget_tables(suite, rows, ["fd", "acc"]))
    assert "At 15 minutes of the budget:" in tables and "| B | 150 | 1 | — | 1000 | 1 | 0.99 |" in tables
    assert tables.count("| B |") == 1 and "At 60" not in tables
    from onestep.suite.spec import table_labels

    # In the tables' method column a label shared by several runs carries the run's name.
    assert table_labels(runs) == {"a": "A (a)", "a1": "A (a1)", "b": "B", "c": "C", "d": "D", "e": "A (e)"}


def test_suite_wall_time_sums_each_invocation_to_its_last_event(tmp_path):
    """Three invocations: one ended (10 min), one killed without a word (its last event 5 min after its
    start), one stopped by a signal (30 min): 45 minutes, the killed one named."""
    from onestep.suite.report import suite_wall_time

    rows = [
        {"time": "2026-12-07T10:00:00+00:00", "event": "start", "commit": "aaa"},
        {"time": "2026-12-07T10:04:00+00:00", "event": "command", "run": "a", "status": "started"},
        {"time": "2026-12-07T10:10:00+00:00", "event": "end"},
        {"time": "2026-12-07T11:00:00+00:00", "event": "start", "commit": "bbb"},
        {"time": "2026-12-07T11:05:00+00:00", "event": "command", "run": "a", "status": "started"},
        "not json (a line cut short by a kill)",
        {"time": "2026-12-07T12:00:00+00:00", "event": "start", "commit": "bbb"},
        {"time": "2026-12-07T12:30:00+00:00", "event": "stopped", "signal": "SIGTERM"},
    ]
    (tmp_path / "suite.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    line = suite_wall_time(tmp_path)
    assert line.startswith("Suite wall time: 0.75 h over 3 invocations since 2026-12-07 10:00 UTC")
    assert "commits aaa, bbb" in line
    assert "1 without a record of its end (running, or killed) counts to the last event" in line
    assert suite_wall_time(tmp_path / "nothing") == ""


def test_curve_figure_draws_a_seeds_group_as_its_mean_and_range():
    """curves.png: runs of one seeds group are one line (mean at the points all of them reached, the
    range shaded); a run on its own is its own line."""
    from types import SimpleNamespace

    from onestep.suite.curves import curve_series
    from onestep.suite.spec import EvalPass

    def run(name, label, seeds=None):
        curve = SimpleNamespace(num_samples=100, schedule="", evals=[EvalPass(nfe=[1])])
        return SimpleNamespace(name=name, label=label, seeds=seeds, curve=curve, cfg=SimpleNamespace(objective={}))

    suite = SimpleNamespace(runs=[run("a", "A", "g"), run("a1", "A", "g"), run("b", "B")])

    def row(name, step, fd):
        return {
            "run": name,
            "step": step,
            "budget_min": step / 10,
            "train_min": 1.0,
            "nfe": 1,
            "guidance": None,
            "sampler": "euler",
            "num_samples": 100,
            "fd": fd,
        }

    rows = [row("a", 10, 50.0), row("a", 20, 40.0), row("a1", 10, 70.0), row("b", 10, 9.0), row("b", 20, 8.0)]
    rows.append(dict(row("b", 20, 1.0), num_samples=1000))  # a full-count row is not on the curve
    series = curve_series(suite, rows, ["fd"])
    assert [(s["label"], s["runs"]) for s in series] == [("A (2 seeds: mean and range)", 2), ("B", 1)]
    assert series[0]["fd"] == ([1.0], [60.0], [50.0], [70.0])  # a1 has not reached step 20 yet
    assert series[1]["fd"] == ([1.0, 2.0], [9.0, 8.0], [9.0, 8.0], [9.0, 8.0])
    # Without a budget the x axis is measured training minutes, which differ between seeds at one step:
    # the group still meets at its common steps (x: their mean minutes).
    for r in rows:
        r["budget_min"], r["train_min"] = None, r["step"] / 10 + (0.5 if r["run"] == "a1" else 0.0)
    series = curve_series(suite, rows, ["fd"])
    assert series[0]["fd"] == ([1.25], [60.0], [50.0], [70.0])
