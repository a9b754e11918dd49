"""Resumable evals (onestep.eval.sample_cache): a killed `onestep eval RUN` resumes from the batches it
had written, with the same rows as an eval that was never interrupted."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_distributed import _free_port
from waiting import HANG_GUARD_S

from onestep.cli import main
from onestep.eval import generate as generate_module
from onestep.eval.sample_cache import CACHE_DIR, SampleCache, SampleCacheRoot, model_identity

REAL_GATHER = generate_module.gather_batch


class Killed(Exception):
    pass


def _train(tiny_recipe, run):
    assert main(["train", str(tiny_recipe), "--run-dir", str(run), "--no-progress", "train.steps=4"]) == 0


def _rows(run):
    path = run / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def _values(rows):
    return {(r["nfe"], r["metric"]): r["value"] for r in rows}


def _count_generated(monkeypatch, kill_after=None):
    """Record the first index of every batch the sampler is asked for; raise Killed after
    ``kill_after`` batches have been generated (after the cache saved them)."""
    starts = []

    def counting(fn, indices):
        if kill_after is not None and len(starts) == kill_after:
            raise Killed
        starts.append(indices[0])
        return REAL_GATHER(fn, indices)

    monkeypatch.setattr(generate_module, "gather_batch", counting)
    return starts


EVAL = ["--nfe", "1", "--num-samples", "250", "--batch-size", "50", "--metrics", "sliced_wasserstein,energy_distance"]


def test_killed_eval_resumes_with_the_same_rows(tiny_recipe, tmp_path, monkeypatch, one_thread):
    run = tmp_path / "run"
    _train(tiny_recipe, run)
    starts = _count_generated(monkeypatch, kill_after=3)
    with pytest.raises(Killed):
        main(["eval", str(run), *EVAL])
    assert starts == [0, 50, 100] and _rows(run) == []
    held = sorted(p.name for p in (run / CACHE_DIR).glob("*/*.pt"))
    assert held == ["0-50.pt", "100-150.pt", "50-100.pt"]

    starts = _count_generated(monkeypatch)
    assert main(["eval", str(run), *EVAL]) == 0
    assert starts == [150, 200]  # only the batches the killed eval had not written
    resumed = _values(_rows(run))
    assert not (run / CACHE_DIR).exists()  # cleared once the rows are written

    starts = _count_generated(monkeypatch)
    assert main(["eval", str(run), *EVAL, "--no-cache"]) == 0
    assert starts == [0, 50, 100, 150, 200] and not (run / CACHE_DIR).exists()
    fresh = _values(_rows(run)[len(resumed) :])
    assert resumed.keys() == fresh.keys() and len(resumed) == 2
    for k in resumed:
        assert resumed[k] == pytest.approx(fresh[k], rel=1e-6), k


def test_torchrun_eval_resumes_from_one_process_batches(tiny_recipe, tmp_path, monkeypatch, one_thread):
    """Rank 0 reads the held batches and broadcasts them; the ranks split only the missing ones. A held
    batch is shifted on disk so that the rows show whether it was read: torchrun's rows must equal one
    process's resumed from the same files, and differ from a fresh eval."""
    run = tmp_path / "run"
    _train(tiny_recipe, run)
    _count_generated(monkeypatch, kill_after=2)
    with pytest.raises(Killed):
        main(["eval", str(run), *EVAL])
    monkeypatch.undo()
    (held,) = (run / CACHE_DIR).glob("*/0-50.pt")
    torch.save({"samples": torch.load(held, weights_only=True)["samples"] + 1.0}, held)
    saved = {p.name: p.read_bytes() for p in held.parent.iterdir()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port())]
    proc = subprocess.run(
        [*cmd, "-m", "onestep", "eval", str(run), *EVAL, "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_ranks = _values(_rows(run))
    assert len(two_ranks) == 2 and not (run / CACHE_DIR).exists()
    held.parent.mkdir(parents=True)
    for name, data in saved.items():
        (held.parent / name).write_bytes(data)
    assert main(["eval", str(run), *EVAL]) == 0
    one = _values(_rows(run)[2:])
    assert main(["eval", str(run), *EVAL, "--no-cache"]) == 0
    fresh = _values(_rows(run)[4:])
    for k in two_ranks:
        assert two_ranks[k] == pytest.approx(one[k], rel=1e-4), k
        assert two_ranks[k] != pytest.approx(fresh[k], rel=1e-2), k


def test_corrupt_cached_batch_is_regenerated_with_a_warning(tiny_recipe, tmp_path, monkeypatch, one_thread):
    run = tmp_path / "run"
    _train(tiny_recipe, run)
    _count_generated(monkeypatch, kill_after=2)
    with pytest.raises(Killed):
        main(["eval", str(run), *EVAL])
    (bad,) = (run / CACHE_DIR).glob("*/50-100.pt")
    bad.write_bytes(b"not a torch file")
    starts = _count_generated(monkeypatch)
    with pytest.warns(UserWarning, match="unreadable cached samples .*50-100.pt"):
        assert main(["eval", str(run), *EVAL]) == 0
    assert starts == [50, 100, 150, 200]
    assert len(_rows(run)) == 2 and not (run / CACHE_DIR).exists()


def test_cache_key_covers_what_the_samples_depend_on(tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"x" * 10)
    model = model_identity(ckpt, "ema")
    root = SampleCacheRoot(tmp_path / CACHE_DIR, model)
    base = dict(objective="MeanFlow", nfe=1, grid=[1.0, 0.0], seed=0, guidance=None, cond=None, data=["d", [2], 0])
    dirs = {root.pass_cache(**base).dir}
    for change in (dict(nfe=2), dict(seed=1), dict(guidance=2.0), dict(data=["d", [2], 10]), dict(grid=[1.0, 0.5])):
        dirs.add(root.pass_cache(**{**base, **change}).dir)
    assert len(dirs) == 6
    assert root.pass_cache(**base).dir in dirs  # the same settings: the same pass
    assert SampleCache(tmp_path, {**model_identity(ckpt, "model"), **base}).dir not in dirs
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new checkpoint in the same place
    assert SampleCache(tmp_path / CACHE_DIR, {**model_identity(ckpt, "ema"), **base}).dir not in dirs

    cache = root.pass_cache(**base)
    cache.save(0, 4, torch.arange(8.0).reshape(4, 2))
    assert torch.equal(cache.load(0, 4), torch.arange(8.0).reshape(4, 2)) and cache.load(4, 8) is None
    assert json.loads((cache.dir / "key.json").read_text())["nfe"] == 1
    root.clear_used()
    assert not (tmp_path / CACHE_DIR).exists()
