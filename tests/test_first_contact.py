"""What a newcomer meets first: compare fits the terminal and keeps its markers, published rows only
for comparable data, 2-D samples are drawn so they read at any count, ls hides test components and
describes recipes, train's help shows the override syntax, train prints a next-step hint."""

import json

import numpy as np
import torch

from onestep.cli import main
from onestep.report.compare import RunSummary, build_table, render
from onestep.viz import density_image


def _summary(name, values):
    info = {
        "data": "checkerboard",
        "objective": "meanflow",
        "backbone": "mlp_toy",
        "regularizers": "-",
        "steps": 3000,
        "params": 250000,
        "train_img_s": 10000.0,
    }
    return RunSummary(name, info, values)


def test_compare_fits_a_100_column_terminal_and_keeps_markers():
    from rich.console import Console

    impl_a, impl_b = "onestep.sliced_wasserstein/v1 (256 projections, seed 0)", "other/v2"
    runs = [
        _summary(
            f"toy_run_with_a_long_name_{i}",
            {
                (m, n, impl_a if i % 2 else impl_b, "ref"): 0.1 * i
                for m in ("sliced_wasserstein", "energy_distance", "checkerboard_outside")
                for n in (1, 2, 100)
            },
        )
        for i in range(7)
    ]
    header, rows, notes = build_table(runs)
    console = Console(width=100, highlight=False, force_terminal=False)
    text = render(header, rows, notes, fmt="rich", console=console)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "[a]" in text and "[b]" in text and "Columns marked [a], [b]" in text
    assert text.count("toy_run_with_a_long_name_3") >= 2  # pages repeat the run column


def test_published_rows_only_for_comparable_data(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        "data: {name: checkerboard}\nobjective: {name: meanflow}\nbackbone: {name: test_mlp}\n"
        "train: {}\neval: {}\nseed: 0\n"
    )
    (run / "metrics.jsonl").write_text(
        json.dumps(
            {"step": 1, "nfe": 1, "metric": "sliced_wasserstein", "value": 0.1, "implementation": "x", "reference": "y"}
        )
        + "\n"
    )
    assert main(["compare", str(run), "--published", "--format", "md"]) == 0
    out = capsys.readouterr()
    assert "MeanFlow-XL/2" not in out.out and "no published numbers for data checkerboard" in out.err
    assert main(["compare", str(run), "--published", "all", "--format", "md"]) == 0
    assert "MeanFlow-XL/2" in capsys.readouterr().out


def test_sixteen_2d_samples_are_sixteen_visible_dots():
    points = torch.tensor([[i - 7.5, (i % 4) - 1.5] for i in range(16)], dtype=torch.float32) * 0.5
    img = np.asarray(density_image(points).convert("L"))
    dark = img < 100  # the dots (the grid, axes and frame are lighter)
    # Connected dark blobs: count them with a flood fill over the thresholded picture.
    seen = np.zeros_like(dark)
    blobs = 0
    for y0, x0 in zip(*np.nonzero(dark)):
        if seen[y0, x0]:
            continue
        blobs += 1
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            if 0 <= y < dark.shape[0] and 0 <= x < dark.shape[1] and dark[y, x] and not seen[y, x]:
                seen[y, x] = True
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    assert blobs == 16
    assert dark.sum() >= 16 * 30  # each dot covers several pixels


def test_ls_hides_test_components_and_describes(capsys):
    assert main(["ls", "backbones"]) == 0
    out = capsys.readouterr().out
    assert "dit_b_2" in out and "test_dit" not in out
    assert main(["ls", "backbones", "--all"]) == 0
    assert "test_dit" in capsys.readouterr().out
    assert main(["ls", "objectives"]) == 0
    out = capsys.readouterr().out
    assert "(module docstring)" not in out and "MeanFlow" in out
    assert main(["ls", "recipes"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("toy_meanflow "))
    assert "checkerboard" in line


def test_train_help_shows_override_syntax(capsys):
    try:
        main(["train", "--help"])
    except SystemExit:
        pass
    assert "KEY=VALUE" in capsys.readouterr().out


def test_thread_settings_are_recorded(tmp_path, monkeypatch):
    """train.threads sets torch's CPU threads; config.yaml's meta records them and the OpenMP spin
    policy the CLI sets unless the environment already chose one."""
    import yaml

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "train",
                    "toy_meanflow",
                    "train.steps=2",
                    "train.threads=1",
                    "--run-dir",
                    str(tmp_path / "r"),
                    "--no-progress",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    meta = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["meta"]
    assert meta["threads"] == 1 and meta["openmp"]["GOMP_SPINCOUNT"] == "1000"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT")
    assert main(["train", "toy_meanflow", "train.steps=2", "--run-dir", str(tmp_path / "r2"), "--no-progress"]) == 0
    meta = yaml.safe_load((tmp_path / "r2" / "config.yaml").read_text())["meta"]
    assert meta["openmp"] == {"OMP_WAIT_POLICY": "ACTIVE"} or "GOMP_SPINCOUNT" not in meta["openmp"]
    assert main(["validate", "toy_meanflow", "train.threads=0"]) == 2


def _cells(rows):
    return {cell for row in rows for cell in row if cell not in ("", "-")}  # "-": nothing to show (dropped)


def test_compare_at_80_and_120_columns_keeps_every_name_and_value_whole():
    """One to three runs: metrics are rows, runs are columns, one table; more runs: run names whole,
    long metric names abbreviated with a legend; never an empty column."""
    from rich.console import Console

    impl = "onestep.sliced_wasserstein/v1 (256 projections, seed 0)"
    for count in (1, 2, 3, 5):
        runs = [
            _summary(
                f"quickstart_{i}" if i else "quickstart",
                {
                    (m, n, impl, "ref"): 0.0755 + 0.01 * i + 0.001 * n
                    for m in ("sliced_wasserstein", "energy_distance", "checkerboard_outside")
                    for n in (1, 2)
                },
            )
            for i in range(count)
        ]
        header, rows, notes = build_table(runs)
        for width in (80, 120):
            text = render(header, rows, notes, fmt="rich", console=Console(width=width, highlight=False))
            lines = text.splitlines()
            assert max(len(line) for line in lines) <= width, (count, width)
            table_lines = [line for line in lines if line.startswith(("┃", "│"))]
            for cell in _cells(rows):  # every run name and every value, whole, on one line of a table
                assert any(cell in line for line in table_lines), (count, width, cell)
            for line in table_lines:  # no empty column: no cell of only spaces in the header row
                if line.startswith("┃"):
                    assert all(part.strip() for part in line.strip("┃").split("┃")[1:]), line
            if count <= 3:
                assert sum(line.startswith("┏") for line in lines) == 1  # one table
                assert any(line.startswith("┃") and all(r[0] in line for r in rows) for line in lines)
