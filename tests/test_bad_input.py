"""Bad input gets one clear line (exit 2), and no run is lost: the writer lock, leftovers of an
earlier run, restricted unpickling of pickled datasets, corrupt files, mismatched resumes, argument
ranges, and resume bookkeeping."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from waiting import HANG_GUARD_S, wait_for

from onestep.cli import main
from onestep.registry import ConfigError
from onestep.utils.rundir import RunDir, load_checkpoint

TINY = """
seed: 1
data: {name: checkerboard}
backbone: {name: test_mlp}
objective: {name: flow_matching}
train: {steps: 4, batch_size: 16, lr: 1e-3, log_every: 1, checkpoint_every: 2, num_preview: 4}
eval: {nfe: [1], num_samples: 64}
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for needle in needles:
        assert needle in err, err
    return err


# ------------------------------------------------------------------------------ lost runs, lock


def test_second_writer_is_refused_with_the_holders_pid(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )  # alive until killed
    try:
        run.mkdir()
        (run / RunDir.LOCK).write_text(f"{holder.pid}\n")
        assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress"]) == 2
        _one_line_error(capsys, f"PID {holder.pid}", "another process")
        assert not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its stale lock is taken over and the run goes ahead; the lock is released.
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress"]) == 0
    assert load_checkpoint(run)["step"] == 4 and not (run / RunDir.LOCK).exists()


def test_two_concurrent_trainings_into_one_dir(recipe, tmp_path):
    """Two real processes: while the first trains (a step budget it cannot finish, so it is alive
    whatever the machine's speed), the second is refused naming the first's PID; the first, stopped
    with SIGTERM, leaves one run's rows."""
    import signal

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "onestep",
        "train",
        str(recipe),
        "--run-dir",
        str(run),
        "--no-progress",
        "train.steps=1000000000",
        "train.log_every=1",
        "train.checkpoint_every=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: RunDir(run).read_stats(), first, "the first run's first stats row")
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
        assert first.poll() is None  # the holder was alive throughout
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=HANG_GUARD_S)
    assert second.returncode == 2, second.stderr[-2000:]
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"is being written by another process (PID {first.pid})" in lines[0], lines
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    steps = [row["step"] for row in RunDir(run).read_stats()]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows, not two interleaved
    assert not (run / RunDir.LOCK).exists()


def test_leftovers_of_an_earlier_run_are_not_overwritten(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"x": 1}, run / "checkpoints" / "step_000000002.pt")  # numbered checkpoint, no last.pt
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress"]) == 2
    _one_line_error(capsys, "already holds a run", "checkpoints/", "--resume")
    other = tmp_path / "other"
    other.mkdir()
    (other / "stats.jsonl").write_text('{"step": 1}\n')
    assert main(["train", str(recipe), "--run-dir", str(other), "--no-progress"]) == 2
    _one_line_error(capsys, "stats.jsonl")
    assert (other / "stats.jsonl").read_text() == '{"step": 1}\n'


# --------------------------------------------------------------------- restricted unpickling


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_cifar10_batch_runs_no_code(tmp_path, capsys):
    from test_loaders import write_cifar10

    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": _Evil(marker), "labels": [0]}, f, protocol=2)
    with pytest.raises(
        ConfigError,
        match=r"data_batch_1: not a plain data pickle.*refused global posix\.system|"
        r"data_batch_1: not a plain data pickle.*refused global os\.system",
    ):
        from onestep.registry import DATASETS

        DATASETS.build("cifar10", root=str(tmp_path))
    assert not marker.exists()


def test_real_format_cifar10_batch_loads_through_the_restricted_unpickler(tmp_path):
    from onestep.utils.safe_pickle import load_plain_pickle

    entry = {
        b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072),
        b"labels": [3, 7],
        b"batch_label": b"training batch 1 of 5",
        b"filenames": [b"a.png", b"b.png"],
    }
    path = tmp_path / "batch"
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    back = load_plain_pickle(path)
    assert np.array_equal(back[b"data"], entry[b"data"]) and back[b"labels"] == [3, 7]
    assert back[b"filenames"] == [b"a.png", b"b.png"]


# -------------------------------------------------------------------------- one-line errors


def test_corrupt_image_in_an_imagefolder(tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / "imgs" / cls / "ok.png")
    (tmp_path / "imgs" / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert (
        main(
            [
                "validate",
                "toy_meanflow",
                f"data={{name: imagefolder, root: {tmp_path / 'imgs'}, image_size: 8}}",
                "backbone={name: test_dit}",
            ]
        )
        == 2
    )
    _one_line_error(capsys, "bad.png: not a readable image")


def test_truncated_and_missing_latent_shards(tmp_path, capsys):
    root = tmp_path / "lat"
    root.mkdir()
    np.savez(root / "s0.npz", latents=np.zeros((4, 4, 8, 8), np.float16), labels=np.zeros(4, np.int64))
    data = (root / "s0.npz").read_bytes()
    (root / "s1.npz").write_bytes(data[: len(data) // 2])
    override = f"data={{name: latents, root: {root}}}"
    assert (
        main(
            [
                "train",
                "toy_meanflow",
                override,
                "backbone={name: test_dit}",
                "--run-dir",
                str(tmp_path / "r"),
                "--no-progress",
            ]
        )
        == 2
    )
    _one_line_error(capsys, "s1.npz", "re-encode")
    missing = f"data={{name: latents, root: {tmp_path / 'nowhere'}}}"
    assert (
        main(
            [
                "train",
                "toy_meanflow",
                missing,
                "backbone={name: test_dit}",
                "--run-dir",
                str(tmp_path / "r2"),
                "--no-progress",
            ]
        )
        == 2
    )
    _one_line_error(capsys, "no latent shards")


def test_resume_onto_another_architecture_names_the_key(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress", "train.steps=2"]) == 0
    raw = RunDir(run).read_config()
    raw["backbone"] = {"name": "mlp_toy", "width": 48, "depth": 2, "input_shape": [2], "num_classes": 0}
    RunDir(run).write_config(raw)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress", "train.steps=4"]) == 2
    _one_line_error(capsys, "size mismatch for", "torch.Size([32, 2])", "torch.Size([48, 2])")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["sample", "RUN", "--nfe", "0", "--out", "x.png"], "--nfe: must be >= 1"),
        (["sample", "RUN", "--nfe", "-1", "--out", "x.png"], "--nfe: must be >= 1"),
        (["sample", "RUN", "-n", "0", "--out", "x.png"], "-n: must be >= 1"),
        (["sample", "RUN", "--batch-size", "0", "--out", "x.png"], "--batch-size: must be >= 1"),
        (["eval", "RUN", "--nfe", "0"], "--nfe: must be >= 1"),
        (["eval", "RUN", "--num-samples", "0"], "--num-samples: must be >= 1"),
    ],
)
def test_arguments_refused_at_parsing(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err.strip().splitlines()[-1]


def test_value_errors_from_components_are_one_line(tmp_path, capsys, monkeypatch):
    """Any ValueError a component raises on a bad value is one line (ONESTEP_DEBUG=1 re-raises)."""
    import onestep.cli.ls

    def boom(args):
        raise ValueError("grid must be 1-D with at least 2 times\nsecond line")

    monkeypatch.setattr(onestep.cli.ls, "run", boom)  # `onestep ls` runs onestep.cli.ls.run
    assert main(["ls"]) == 2
    _one_line_error(capsys, "ValueError: grid must be 1-D", "ONESTEP_DEBUG")
    monkeypatch.setenv("ONESTEP_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["ls"])


# ---------------------------------------------------------------------------- silently accepted


def test_resume_below_the_current_step_is_refused(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress", "train.steps=2"]) == 2
    _one_line_error(capsys, "the run is at step 4", "train.steps=2", "N > 4")


def test_batch_larger_than_the_data_is_refused_unless_allowed(tmp_path, capsys):
    args = [
        "train",
        "digits_meanflow",
        "train.batch_size=4000",
        "train.steps=1",
        "--no-progress",
        "--run-dir",
        str(tmp_path / "r"),
    ]
    assert main(args) == 2
    _one_line_error(capsys, "train.batch_size=4000 is larger than the 1797 examples", "batch_with_repeats")
    assert (
        main(
            args[:-2]
            + [
                "--run-dir",
                str(tmp_path / "r2"),
                "train.batch_size=2000",
                "train.batch_with_repeats=true",
                "backbone.depth=1",
                "backbone.hidden_size=32",
                "backbone.num_heads=2",
                "train.sample_every=0",
                "train.num_preview=10",
            ]
        )
        == 0
    )


def test_resume_after_sigkill_drops_replayed_stats_rows(recipe, tmp_path):
    """A killed run's stats.jsonl has rows past its last checkpoint; the resumed run replaces them, so
    steps only go up."""
    import signal

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "onestep",
        "train",
        str(recipe),
        "--run-dir",
        str(run),
        "--no-progress",
        "train.steps=1000000000",
        "train.checkpoint_every=25",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    stats = run / "stats.jsonl"
    # Freeze the process (SIGSTOP) and look: kill it only in a state with rows past its last checkpoint,
    # otherwise let it run on and look again. No timing involved.
    while True:
        wait_for(lambda: (rows := RunDir(run).read_stats()) and rows[-1]["step"] >= 40, proc, "step 40")
        proc.send_signal(signal.SIGSTOP)
        if RunDir(run).read_stats()[-1]["step"] > load_checkpoint(run)["step"]:
            break
        proc.send_signal(signal.SIGCONT)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_checkpoint(run)["step"]
    before = RunDir(run).read_stats()
    assert before[-1]["step"] > step  # rows past the checkpoint
    assert main(["train", "--resume", str(run), "--no-progress", f"train.steps={step + 10}"]) == 0
    steps = [r["step"] for r in RunDir(run).read_stats()]
    assert steps == sorted(set(steps)) and steps[-1] == step + 10
    assert [json.loads(line)["step"] for line in stats.read_text().splitlines()] == steps
