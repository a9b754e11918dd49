"""Loggers: every logger gets the rows stats.jsonl gets; TensorBoard's own reader and an offline
wandb run read back the same scalars."""

import json

import pytest

from onestep.cli import main
from onestep.registry import LOGGERS

RECIPE = """
seed: 0
data: {name: checkerboard}
backbone: {name: test_mlp}
objective: {name: meanflow}
train: {steps: 6, batch_size: 32, lr: 1e-3, log_every: 2, checkpoint_every: 0, num_preview: 8, sample_every: 3}
eval: {nfe: [1], num_samples: 64, every: 3}
"""


def _stats(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def test_registered_and_validated(tmp_path, capsys):
    assert {"jsonl", "tensorboard", "wandb"} <= set(LOGGERS.names())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert main(["validate", str(recipe), "train.loggers=[jsonl,tensorbord]"]) == 2
    assert "unknown logger 'tensorbord'" in capsys.readouterr().err
    assert main(["validate", str(recipe), "train.loggers=[{name: tensorboard, flush_secs: 0}]"]) == 2
    assert "flush_secs must be >= 1" in capsys.readouterr().err


def test_tensorboard_event_file_matches_stats(tmp_path, one_thread):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    assert (
        main(["train", str(recipe), "--run-dir", str(run), "--no-progress", "train.loggers=[jsonl,tensorboard]"]) == 0
    )
    rows = _stats(run)
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    for key in ("loss", "loss_main", "mse", "grad_norm", "lr"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in rows], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        events = acc.Scalars(f"eval/{m['metric']}@{m['nfe']}")
        assert any(e.step == m["step"] and e.value == pytest.approx(m["value"], rel=1e-6) for e in events)
    assert "samples/nfe1" in tags["images"]


def test_wandb_offline_run(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(recipe),
                "--run-dir",
                str(run),
                "--no-progress",
                "train.loggers=[{name: wandb, project: onestep-test}]",
            ]
        )
        == 0
    )
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    # The offline record log holds every row's values as JSON (wandb has no offline reader API).
    rows = _stats(run)
    record = offline[0].read_bytes()
    assert record.count(b"loss_main") >= len(rows), (len(record), record.count(b"loss_main"))
    for row in rows:
        for key in ("loss", "loss_main", "grad_norm"):
            assert json.dumps(row[key]).encode() in record, (row["step"], key)
    assert b"eval/sliced_wasserstein@1" in record and b"meanflow" in record  # eval rows, config
