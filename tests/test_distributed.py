"""Two gloo processes with batch B/2 each train to the same parameters as one process with batch B.

The objectives draw their noise and times from the global RNG, which differs per rank by design. To
compare runs exactly, the test objectives below derive each sample's (e, t, r) from the sample
itself, so the only thing that can differ between the runs is how gradients are combined.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from waiting import HANG_GUARD_S

from onestep.config import from_dict
from onestep.objectives.common import expand_time, target_velocity
from onestep.objectives.consistency import ConsistencyTraining, pair_weights
from onestep.objectives.consistency_math import karras_sigmas, sigma_to_t
from onestep.objectives.flow_matching import FlowMatching
from onestep.objectives.meanflow import MeanFlow
from onestep.objectives.scm import SCM
from onestep.registry import OBJECTIVES
from onestep.utils.rundir import load_checkpoint


def _per_sample_randomness(x: torch.Tensor):
    """(e, t, r) as a function of each sample's bytes: identical whichever rank holds the sample."""
    flat = x.detach().reshape(x.shape[0], -1).float().cpu()
    seeds = (flat * 1000).round().long().abs().sum(1) * 7919 + (flat * 97).round().long().abs().sum(1)
    e, t, r = torch.empty_like(flat), torch.empty(x.shape[0]), torch.empty(x.shape[0])
    g = torch.Generator()
    for i, s in enumerate(seeds.tolist()):
        g.manual_seed(int(s))
        e[i] = torch.randn(flat.shape[1], generator=g)
        a, b = torch.rand(2, generator=g).tolist()
        t[i], r[i] = max(a, b), (min(a, b) if i % 2 else max(a, b))
    return e.view_as(x).to(x.device), t.to(x.device), r.to(x.device)


class IndexedMeanFlow(MeanFlow):
    def loss(self, net, x, y, *, step, feature_blocks=()):
        e, t, r = _per_sample_randomness(x)
        return self.loss_given(net, x, y, e=e, t=t, r=r, feature_blocks=feature_blocks)


class IndexedMeanFlowBatchPosterior(MeanFlow):
    """MeanFlow with the batch-posterior velocity: its reference set must be the global batch."""

    def __init__(self, **kwargs):
        super().__init__(velocity_estimate="batch_posterior", **kwargs)

    def loss(self, net, x, y, *, step, feature_blocks=()):
        e, t, r = _per_sample_randomness(x)
        v = target_velocity(self.velocity_estimate, x, e, t, None, None, 0)
        return self.loss_given(net, x, y, e=e, t=t, r=r, v=v, feature_blocks=feature_blocks)


class IndexedFlowMatching(FlowMatching):
    def loss(self, net, x, y, *, step, feature_blocks=()):
        e, t, _ = _per_sample_randomness(x)
        return self.loss_given(net, x, y, e=e, t=t, feature_blocks=feature_blocks)


class IndexedConsistencyTraining(ConsistencyTraining):
    """iCT with the grid index and the shared noise taken from the sample (sg target, as iCT)."""

    def loss(self, net, x, y, *, step, feature_blocks=()):
        e, t, _ = _per_sample_randomness(x)
        num = self.num_scales(step)
        sigmas = karras_sigmas(num, self.sigma_min, self.sigma_max, self.rho)
        index = (t.cpu() * (num - 1)).long().clamp(max=num - 2)
        sigma_lo, sigma_hi = sigmas[index].to(x.device), sigmas[index + 1].to(x.device)
        t_lo, t_hi = sigma_to_t(sigma_lo).to(x.dtype), sigma_to_t(sigma_hi).to(x.dtype)
        z_hi = (1 - expand_time(t_hi, x)) * x + expand_time(t_hi, x) * e
        z_lo = (1 - expand_time(t_lo, x)) * x + expand_time(t_lo, x) * e
        return self.pair_loss(
            net,
            net,
            x,
            None,
            z_hi=z_hi,
            t_hi=t_hi,
            z_lo=z_lo,
            t_lo=t_lo,
            weight=pair_weights(self.weighting, sigma_lo, sigma_hi),
            feature_blocks=feature_blocks,
            logs={},
        )


class IndexedSCM(SCM):
    """sCT with its noise and TrigFlow time taken from the sample: ln(σ_d tan ϑ) = P_mean + P_std·Φ⁻¹(u).
    A 2-step tangent warm-up, so the 3 steps cover r = 0, 1/2, 1. The weight head is learned, so the
    runs must also agree on the objective's own parameters (all-reduced with the net's)."""

    def __init__(self, **kwargs):
        super().__init__(**{"tangent_warmup_steps": 2, **kwargs})

    def loss(self, net, x, y, *, step, feature_blocks=(), target_net=None):
        e, u, _ = _per_sample_randomness(x)
        normal = torch.distributions.Normal(
            torch.tensor(self.P_mean, dtype=torch.float64), torch.tensor(self.P_std, dtype=torch.float64)
        )
        theta = torch.atan(torch.exp(normal.icdf(u.double().clamp(0.01, 0.99))) / self.sigma_d)
        return self.loss_given(
            net, x, y, e=e, theta=theta, step=step, feature_blocks=feature_blocks, target_net=target_net
        )


if "_test_indexed_meanflow" not in OBJECTIVES.names():
    OBJECTIVES.register("_test_indexed_meanflow")(IndexedMeanFlow)
    OBJECTIVES.register("_test_indexed_meanflow_bp")(IndexedMeanFlowBatchPosterior)
    OBJECTIVES.register("_test_indexed_flow_matching")(IndexedFlowMatching)
    OBJECTIVES.register("_test_indexed_consistency")(IndexedConsistencyTraining)
    OBJECTIVES.register("_test_indexed_scm")(IndexedSCM)


def _raw(objective: str, steps: int = 3) -> dict:
    return {
        "seed": 5,
        "data": {"name": "digits", "conditional": False},
        "backbone": {"name": "test_dit"},
        "objective": {"name": objective, **({"total_steps": steps} if "consistency" in objective else {})},
        "regularizers": [{"name": "dispersive", "weight": 0.5, "blocks": [0], "gather": True}],
        # SGD: Adam turns float-rounding noise in near-zero gradients into +-lr steps, which would
        # hide real agreement behind a loose tolerance.
        "train": {
            "steps": steps,
            "batch_size": 16,
            "optimizer": "sgd",
            "lr": 0.002,
            "ema_decay": 0.5,
            "log_every": 1,
            "checkpoint_every": 0,
            "num_preview": 4,
        },
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, objective: str, run_dir: str) -> None:
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
    from onestep.train.loop import Trainer
    from onestep.utils import distributed

    distributed.init_from_env("cpu")
    try:
        Trainer(from_dict(_raw(objective)), run_dir, progress=False).run()
    finally:
        distributed.shutdown()


@pytest.mark.parametrize(
    "objective",
    [
        "_test_indexed_flow_matching",
        "_test_indexed_meanflow",
        "_test_indexed_meanflow_bp",
        "_test_indexed_consistency",
        "_test_indexed_scm",
    ],
)
def test_two_ranks_equal_one_process(objective, tmp_path):
    from onestep.train.loop import Trainer

    single, double = tmp_path / "single", tmp_path / "double"
    Trainer(from_dict(_raw(objective)), single, progress=False).run()
    mp.spawn(_worker, args=(2, _free_port(), objective, str(double)), nprocs=2, join=True)
    a, b = load_checkpoint(single), load_checkpoint(double)
    assert a["step"] == b["step"] == 3
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(b["ema"][k], a["ema"][k], rtol=1e-4, atol=1e-5, msg=k)
    # The objective's own parameters (sCM's weight head) are all-reduced and EMA'd like the net's.
    assert ("objective_params" in a) == ("objective_params" in b) == (objective == "_test_indexed_scm")
    for section in ("objective_params", "objective_params_ema"):
        for k in a.get(section, {}):
            torch.testing.assert_close(b[section][k], a[section][k], rtol=1e-4, atol=1e-6, msg=f"{section}.{k}")
            assert a[section][k].abs().sum() > 1e-6  # the head really moved
    # The runs really trained: parameters moved away from the freshly built (same seed) model.
    fresh = Trainer(from_dict(_raw(objective, steps=1)), tmp_path / "fresh", progress=False)
    diff = sum((a["model"][k].float() - v.float()).abs().sum().item() for k, v in fresh.net.state_dict().items())
    assert diff > 1e-3


def test_ranks_without_sync_would_differ(tmp_path):
    """The comparison above can fail: one rank training alone on its half-batch ends elsewhere."""
    from onestep.train.loop import Trainer

    full = Trainer(from_dict(_raw("_test_indexed_meanflow")), tmp_path / "full", progress=False)
    full.run()
    half_raw = _raw("_test_indexed_meanflow")
    half_raw["train"]["batch_size"] = 8
    half = Trainer(from_dict(half_raw), tmp_path / "half", progress=False)
    half.run()
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "half")
    assert any(not torch.allclose(a["model"][k], b["model"][k], atol=1e-5) for k in a["model"])


def test_torchrun_cli_two_processes(tmp_path, tiny_recipe):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(_free_port()),
        "-m",
        "onestep",
        "train",
        str(tiny_recipe),
        "--run-dir",
        str(run),
        "--no-progress",
        "train.steps=4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(run)
    assert proc.stdout.count(str(run)) == 1  # only rank 0 prints
    assert load_checkpoint(run)["step"] == 4
