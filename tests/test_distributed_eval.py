"""Evaluation under torchrun: every rank generates its share, and the numbers equal one process's.

Samples are per-index (noise and consistency re-noising seeded per sample), so splitting a batch
over ranks and all-gathering it must give the same samples, and so the same metrics.
"""

import json
import os
import subprocess
import sys

import torch
import torch.multiprocessing as mp
from test_distributed import _free_port
from waiting import HANG_GUARD_S


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    from onestep.utils import distributed

    distributed.init_from_env("cpu")
    seen: list[int] = []

    def fn(ids):
        seen.extend(ids)
        return torch.tensor(ids, dtype=torch.float32)[:, None] * torch.tensor([1.0, -1.0, 0.5])

    try:
        results = {n: distributed.gather_batch(fn, list(range(100, 100 + n))) for n in (1, 2, 3, 5, 8)}
    finally:
        distributed.shutdown()
    torch.save({"results": results, "seen": seen}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_gather_batch_splits_work_and_restores_order(tmp_path):
    mp.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    seen = []
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for n, got in out["results"].items():
            ids = torch.arange(100, 100 + n, dtype=torch.float32)[:, None]
            torch.testing.assert_close(got, ids * torch.tensor([1.0, -1.0, 0.5]))
        seen.append(set(out["seen"]))
    # Each rank computed its own share (plus at most one padding row per call), not the whole batch.
    assert {100, 102, 104, 106} <= seen[0] and 101 not in seen[0] and 103 not in seen[0]
    assert {101, 103, 105, 107} <= seen[1] and 102 not in seen[1]


RECIPE = """
seed: 1
data: {name: digits, image_size: 8}
backbone: {name: test_dit}
objective: {name: consistency_training, total_steps: 4}
train: {steps: 4, batch_size: 16, lr: 0.001, ema_decay: 0.5, log_every: 2, checkpoint_every: 0, num_preview: 4}
eval: {nfe: [1, 2], num_samples: 40, batch_size: 16}
"""


def _eval(cmd_prefix, run, env, cwd):
    cmd = [
        *cmd_prefix,
        "-m",
        "onestep",
        "eval",
        str(run),
        "--nfe",
        "1",
        "--nfe",
        "2",
        "--metrics",
        "fid,sliced_wasserstein",
        "--feature-extractor",
        "onestep-random-conv",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_eval_equals_one_process(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "onestep",
            "train",
            str(recipe),
            "--run-dir",
            str(run),
            "--no-progress",
            "train.device=cpu",
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env=env,
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    _eval([sys.executable], run, env, tmp_path)
    one = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    proc = _eval(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port())],
        run,
        env,
        tmp_path,
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    two = rows[len(one) :]
    assert len(one) == 4 and len(two) == 4  # rank 0 alone writes
    assert proc.stdout.count("sliced_wasserstein") >= 1 and proc.stdout.count("step 4") == 1  # one table
    for a, b in zip(one, two):
        assert (a["nfe"], a["metric"]) == (b["nfe"], b["metric"])
        assert a["value"] > 0
        assert abs(a["value"] - b["value"]) <= 1e-4 * abs(a["value"]) + 1e-6, (a, b)
