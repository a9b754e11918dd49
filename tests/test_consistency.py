"""Consistency objectives (CT / iCT, CD, ECT): closed-form schedules, the boundary condition, the
teacher ODE step against the exact Gaussian flow, zero loss for the exact consistency function,
losses and sampling on registered backbones, the EMA target, and CLI distillation end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from gaussian_closed_form import GaussianClosedForm
from torch import nn

from onestep.objectives.consistency_math import (
    consistency_fn,
    ct_num_scales,
    ect_r,
    ema_decay_mu,
    euler_step,
    heun_step,
    ict_huber_c,
    ict_num_scales,
    karras_sigmas,
    lognormal_grid_weights,
    pseudo_huber,
    sigma_to_t,
    t_to_sigma,
)
from onestep.registry import BACKBONES, OBJECTIVES, ConfigError
from onestep.sampling import sample

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions run faster on one thread


# ----------------------------------------------------------------------------------------------
# Analytic modules in the backbone contract.


class GaussianData(GaussianClosedForm):
    """Data x ~ N(μ, s²I) (docs/reference.md, "Closed forms for tests"). ``forward`` is the exact consistency net
    F*(z, t) = (z − f*(z, t))/t with f*(z, t) = μ + s·(z − m(t))/σ(t) (the flow map to t = 0), so
    z − t·F* = f*; ``velocity`` the exact marginal velocity; ``flow`` the exact ODE map t -> r."""

    def f_exact(self, z, t):
        return self.flow(z, t, torch.zeros_like(t))

    def forward(self, z, t, h=None, y=None):
        return (z - self.f_exact(z, t)) / t.clamp(min=1e-300)[:, None]


class GaussianVelocity(GaussianData):
    """The same data, as a flow-matching teacher: forward = v(z, t) = m' + σ'/σ·(z − m)."""

    def forward(self, z, t, h=None, y=None):
        return self.marginal_velocity(z, t)


def build(name, **kw):
    return BACKBONES.build(name, **kw)


def ct(**kw):
    return OBJECTIVES.build("consistency_training", **{"total_steps": 100, **kw})


# ----------------------------------------------------------------------------------------------
# Pure functions.


def test_sigma_t_map_and_karras_grid():
    sigma = torch.tensor([0.002, 0.821, 1.0, 80.0], dtype=DT)
    t = sigma_to_t(sigma)
    assert torch.allclose(t, sigma / (1 + sigma)) and torch.allclose(t_to_sigma(t), sigma)
    assert sigma_to_t(1.0) == 0.5 and sigma_to_t(math.inf) == 1.0 and t_to_sigma(1.0) == math.inf
    # z_t = (1 - t) x_sigma with x_sigma = x + sigma e.
    x, e = torch.randn(5, dtype=DT), torch.randn(5, dtype=DT)
    tt = float(sigma_to_t(3.0))
    assert torch.allclose((1 - tt) * x + tt * e, (1 - tt) * (x + 3.0 * e))
    grid = karras_sigmas(3, 0.002, 80.0, 7.0)
    mid = ((0.002 ** (1 / 7) + 80 ** (1 / 7)) / 2) ** 7
    assert torch.allclose(grid, torch.tensor([0.002, mid, 80.0], dtype=DT))
    assert (karras_sigmas(11).diff() > 0).all()


def test_ict_and_ct_curricula_hand_values():
    # K = 800K: K' = floor(800000 / (log2(128) + 1)) = 100000.
    K = 800_000
    assert [ict_num_scales(k, K) for k in (0, 99_999, 100_000, 250_000, 600_000, 699_999, 700_000, 10**7)] == [
        11,
        11,
        21,
        41,
        641,
        641,
        1281,
        1281,
    ]
    # s1/s0 = 100: K' = floor(1000 / (log2(100) + 1)) = floor(1000 / 7.6439) = 130.
    assert ict_num_scales(129, 1000, 10, 1000) == 11 and ict_num_scales(130, 1000, 10, 1000) == 21
    # CT: N(0) = ceil(2 - 1) + 1 = 2; N(K) = ceil(151 - 1) + 1 = 151;
    # N(K/2) = ceil(sqrt(0.5 * (151^2 - 4) + 4) - 1) + 1 = ceil(105.78) + 1 = 107.
    assert [ct_num_scales(k, 1000) for k in (0, 500, 1000, 5000)] == [2, 107, 151, 151]
    # mu(k) = exp(s0 log mu0 / N(k)).
    assert ema_decay_mu(0, 1000, 2, 150, 0.9, "ct") == pytest.approx(0.9)
    assert ema_decay_mu(1000, 1000, 2, 150, 0.9, "ct") == pytest.approx(math.exp(2 * math.log(0.9) / 151))
    assert ema_decay_mu(0, K, 10, 1280, 0.9, "ict") == pytest.approx(math.exp(10 * math.log(0.9) / 11))


def test_lognormal_grid_weights_match_erf_formula():
    sigmas = karras_sigmas(21)
    p = lognormal_grid_weights(sigmas, -1.1, 2.0)
    assert p.shape == (20,) and p.sum().item() == pytest.approx(1.0) and (p > 0).all()
    cdf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sigmas.tolist()]
    raw = [b - a for a, b in zip(cdf[:-1], cdf[1:])]
    assert torch.allclose(p, torch.tensor(raw, dtype=DT) / sum(raw))
    # The mode sits on the interval around exp(P_mean) in log-space density terms: most mass below σ = 5.
    assert p[sigmas[1:] <= 5.0].sum() > 0.75


def test_pseudo_huber_value_and_limits():
    delta = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=DT)
    assert torch.allclose(pseudo_huber(delta, 0.5), torch.tensor([math.sqrt(25.25) - 0.5, 0.0], dtype=DT))
    assert torch.allclose(pseudo_huber(delta, 0.0), torch.tensor([5.0, 0.0], dtype=DT))
    small = torch.full((1, 4), 1e-4, dtype=DT)  # ‖Δ‖ = 2e-4 ≪ c
    assert pseudo_huber(small, 1.0).item() == pytest.approx(4e-8 / 2, rel=1e-6)
    large = torch.full((1, 4), 1e3, dtype=DT)  # ‖Δ‖ = 2000 ≫ c
    assert pseudo_huber(large, 0.03).item() == pytest.approx(2000 - 0.03, rel=1e-9)
    assert ict_huber_c(3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072))
    # c = 0 (ECT's plain norm): finite gradient at Δ = 0.
    zero = torch.zeros(2, 3, dtype=DT, requires_grad=True)
    pseudo_huber(zero, 0.0).sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_ect_mapping_and_stage():
    sigma = torch.tensor([1.0, 10.0], dtype=DT)
    n = 1 + 8 * torch.sigmoid(-sigma)
    # Stage 0: σ_r = σ(1 − n/2) -> 0 (clamped) for σ = 1, ≈ σ/2 for σ = 10.
    assert torch.allclose(ect_r(sigma, 0), torch.stack([torch.zeros((), dtype=DT), 10 * (1 - n[1] / 2)]))
    # Stage 3: q^-(4) = 1/16.
    assert torch.allclose(ect_r(sigma, 3), sigma * (1 - n / 16))
    assert torch.allclose(ect_r(sigma, 3, q=4.0), sigma * (1 - n / 256))
    obj = OBJECTIVES.build("ect", stage_steps=10)
    assert [obj.stage(k) for k in (0, 9, 10, 35)] == [0, 0, 1, 3]
    # Later stages give r closer to t.
    gaps = [(sigma - ect_r(sigma, s)).tolist() for s in range(4)]
    assert all(a[1] > b[1] for a, b in zip(gaps[:-1], gaps[1:]))


@pytest.mark.parametrize("name, shape", [("test_mlp", (2,)), ("test_dit", (4, 8, 8)), ("test_unet", (3, 8, 8))])
def test_boundary_condition_by_construction(name, shape):
    torch.manual_seed(0)
    net = build(name, input_shape=shape)
    for p in net.parameters():  # make the output non-trivial (zero-initialised heads)
        nn.init.normal_(p, std=0.3)
    z = torch.randn(3, *shape)
    for interval in ("t", "zero"):
        assert torch.equal(consistency_fn(net, z, torch.zeros(3), interval=interval), z)
        assert not torch.allclose(consistency_fn(net, z, torch.full((3,), 0.5), interval=interval), z)


# ----------------------------------------------------------------------------------------------
# Teacher ODE step and exact consistency functions (Gaussian data, float64).


def test_heun_step_matches_exact_flow_second_order():
    torch.manual_seed(0)
    teacher = GaussianVelocity(torch.tensor([1.0, -2.0, 0.5], dtype=DT), 0.3)
    z = torch.randn(64, 3, dtype=DT)
    t = torch.full((64,), 0.5, dtype=DT)
    err = {}
    for dt in (0.1, 0.05, 0.025):
        exact = teacher.flow(z, t, t - dt)
        err[dt] = (
            (heun_step(teacher, z, t, t - dt) - exact).norm().item(),
            (euler_step(teacher, z, t, t - dt) - exact).norm().item(),
        )
    for dt in err:
        assert err[dt][0] < 0.25 * err[dt][1]  # Heun ≪ Euler
    # Local error O(Δt³) for Heun (ratio 1/8 per halving), O(Δt²) for Euler (1/4).
    for big, small in ((0.1, 0.05), (0.05, 0.025)):
        assert err[small][0] / err[big][0] < 0.16
        assert 0.2 < err[small][1] / err[big][1] < 0.3
    assert err[0.025][0] < 1e-3


@pytest.mark.parametrize("objective", ["ct", "ct_ema", "cd", "ect"])
def test_exact_consistency_function_gives_zero_loss_on_point_data(objective):
    """Point data x = μ: every ODE trajectory is the straight line (1 − t)μ + t·e, so CT/ECT pairs with
    shared noise and CD's Heun step land on the same trajectory; f* = μ gives zero loss."""
    torch.manual_seed(0)
    mu = torch.tensor([0.7, -1.3], dtype=DT)
    exact, teacher = GaussianData(mu, 0.0), GaussianVelocity(mu, 0.0)
    obj = {
        "ct": lambda: ct(),
        "ct_ema": lambda: ct(target="ema", schedule="ct"),
        "cd": lambda: OBJECTIVES.build("consistency_distillation", teacher=teacher),
        "ect": lambda: OBJECTIVES.build("ect"),
    }[objective]()
    x = mu.expand(256, 2).clone()
    out = obj.loss(exact, x, None, step=50)
    assert out.loss.shape == (256,) and out.loss.abs().max().item() < 1e-8
    # A function that is not constant along the straight trajectories is penalized.
    wrong = GaussianData(mu, 0.3)
    assert obj.loss(wrong, x, None, step=50).loss.mean().item() > 1e-3


def test_cd_with_exact_teacher_and_exact_student_on_gaussian_data():
    torch.manual_seed(0)
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    teacher, exact = GaussianVelocity(mu, 0.5), GaussianData(mu, 0.5)
    x = mu + 0.5 * torch.randn(512, 3, dtype=DT)
    for solver, bound in (("heun", 1e-2), ("euler", None)):
        obj = OBJECTIVES.build("consistency_distillation", teacher=teacher, solver=solver, num_scales=200, metric="l2")
        torch.manual_seed(1)
        loss = obj.loss(exact, x, None, step=0).loss
        if bound:
            heun_loss = loss.mean().item()
            assert heun_loss < bound
        else:
            assert loss.mean().item() > 10 * heun_loss
    # The exact f* is far better than a slightly wrong one under the same objective.
    obj = OBJECTIVES.build("consistency_distillation", teacher=teacher, num_scales=200, metric="l2")
    torch.manual_seed(1)
    wrong = obj.loss(GaussianData(mu, 0.4), x, None, step=0).loss.mean().item()
    assert wrong > 100 * heun_loss


# ----------------------------------------------------------------------------------------------
# Objectives on registered backbones.


def _objectives(teacher_shape):
    teacher = (
        build("test_mlp", input_shape=teacher_shape)
        if len(teacher_shape) == 1
        else build("test_dit", input_shape=teacher_shape)
    )
    teacher.eval().requires_grad_(False)
    return {
        "ict": ct(),
        "ct_ema": ct(schedule="ct", target="ema", metric="l2"),
        "cd": OBJECTIVES.build("consistency_distillation", teacher=teacher),
        "cd_euler_ema": OBJECTIVES.build(
            "consistency_distillation",
            teacher=teacher,
            solver="euler",
            target="ema",
            index_dist="uniform",
            weighting="uniform",
        ),
        "ect": OBJECTIVES.build("ect", stage_steps=3),
        "ect_t": OBJECTIVES.build("ect", interval="t", huber_c=0.01),
    }


@pytest.mark.parametrize("name, shape", [("test_mlp", (2,)), ("test_dit", (4, 8, 8))])
def test_loss_shapes_features_gradients(name, shape):
    torch.manual_seed(0)
    for key, obj in _objectives(shape).items():
        net = build(name, input_shape=shape, num_classes=3)
        x, y = torch.randn(8, *shape), torch.randint(0, 3, (8,))
        out = obj.loss(net, x, y, step=5, feature_blocks=(0, 1))
        assert out.loss.shape == (8,) and torch.isfinite(out.loss).all(), key
        assert len(out.features) == 2 and out.features[0].shape[0] == 8, key
        assert out.logs["distance"] >= 0 and not any(k.startswith("loss") for k in out.logs), key
        (out.loss.mean() + out.features[0].square().mean()).backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), key
        assert any(g.abs().sum() > 0 for g in grads), key


def test_unet_consistency_loss_and_sampling():
    torch.manual_seed(0)
    net = build("test_unet", input_shape=(3, 8, 8), dropout=0.1)
    obj = ct()
    out = obj.loss(net, torch.randn(4, 3, 8, 8), None, step=0, feature_blocks=tuple(net.encoder_blocks))
    out.loss.mean().backward()
    assert out.loss.shape == (4,) and out.features[0].ndim == 4
    net.eval()
    x = sample(obj, net, torch.randn(4, 3, 8, 8), nfe=2)
    assert x.shape == (4, 3, 8, 8) and torch.isfinite(x).all()


def test_target_and_online_pass_share_dropout_mask():
    """With z_lo = z_hi and t_lo = t_hi the loss is zero only if both passes drew the same mask."""
    torch.manual_seed(0)
    net = BACKBONES.build("mlp_toy", input_shape=(2,), width=32, depth=2, dropout=0.5).train()
    obj = ct(metric="l2")
    x = torch.randn(16, 2)
    t = torch.full((16,), 0.5)
    z = 0.5 * x + 0.5 * torch.randn(16, 2)
    out = obj.pair_loss(
        net, net, x, None, z_hi=z, t_hi=t, z_lo=z, t_lo=t, weight=torch.ones(16), feature_blocks=(), logs={}
    )
    assert out.loss.abs().max().item() == 0.0
    # Two plain forward passes do differ (the mask is random).
    assert not torch.equal(net(z, t, t), net(z, t, t))


def test_labels_pass_through_with_class_dropout():
    seen = []

    class Spy(nn.Module):
        num_classes = 5

        def forward(self, z, t, h=None, y=None):
            seen.append(y.clone())
            return torch.zeros_like(z)

    y = torch.arange(5).repeat(40)
    for dropout, check in ((0.0, lambda s: torch.equal(s, y)), (0.9, lambda s: (s == 5).float().mean() > 0.7)):
        seen.clear()
        ct(class_dropout=dropout).loss(Spy(), torch.randn(200, 2), y, step=0)
        assert seen and all(check(s) for s in seen)


def test_ema_target_is_owned_by_the_training_step():
    """The objective declares μ(k); TrainStep keeps θ⁻, updates it after each optimizer step with
    μ(step), passes it to the loss, and round-trips it through a checkpoint state."""
    from onestep.train.step import TrainStep

    torch.manual_seed(0)
    net = build("test_mlp")
    obj = ct(schedule="ct", target="ema", mu0=0.9, total_steps=10)
    assert obj.target_decay(0) == pytest.approx(ema_decay_mu(0, 10, 2, 150, 0.9, "ct")) and ct().target_decay(0) is None
    seen = []
    real = obj.loss

    def spy(net_, x, y, *, step, feature_blocks=(), target_net=None):
        seen.append(target_net)
        return real(net_, x, y, step=step, feature_blocks=feature_blocks, target_net=target_net)

    obj.loss = spy
    step_fn = TrainStep(net, obj, [], torch.optim.SGD(net.parameters(), lr=0.5), ema_decay=0.9)
    target = step_fn.target.model
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), net.parameters()))
    x = torch.randn(16, 2)
    before = [p.detach().clone() for p in target.parameters()]
    step_fn(x, None, step=0, lr=0.5)
    assert seen[-1] is target
    mu = obj.target_decay(0)
    for old, new, cur in zip(before, target.parameters(), net.parameters()):
        assert torch.allclose(new, mu * old + (1 - mu) * cur.detach(), atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(target.parameters(), net.parameters()))
    # Round trip through a weights_only checkpoint state.
    import io

    buf = io.BytesIO()
    torch.save(step_fn.state(), buf)
    buf.seek(0)
    fresh_net = build("test_mlp")
    fresh = TrainStep(
        fresh_net,
        ct(schedule="ct", target="ema", mu0=0.9, total_steps=10),
        [],
        torch.optim.SGD(fresh_net.parameters(), lr=0.5),
        ema_decay=0.9,
    )
    fresh.load_state(torch.load(buf, weights_only=True), step=1)
    assert all(torch.equal(a, b) for a, b in zip(fresh.target.model.parameters(), target.parameters()))
    # Without a target the objective uses θ itself (sg), and no target is kept.
    plain = TrainStep(build("test_mlp"), ct(), [], torch.optim.SGD(net.parameters(), lr=0.1), ema_decay=0.9)
    assert plain.target is None and "target_net" not in plain.state()


def test_errors_are_clear():
    with pytest.raises(ConfigError, match="missing required key.*total_steps"):
        OBJECTIVES.build("consistency_training")
    with pytest.raises(ConfigError, match="needs a teacher"):
        OBJECTIVES.build("consistency_distillation").loss(build("test_mlp"), torch.randn(4, 2), None, step=0)
    with pytest.raises(ConfigError, match="schedule"):
        OBJECTIVES.build("consistency_training", total_steps=10, schedule="lcm")
    with pytest.raises(ValueError, match="metric"):
        ct(metric="lpips")


# ----------------------------------------------------------------------------------------------
# Sampling.


def test_time_grid_and_prior():
    obj = ct()
    t_max, t_mid = 80 / 81, 0.821 / 1.821
    assert torch.allclose(obj.time_grid(1), torch.tensor([t_max, 0.0]))
    assert torch.allclose(obj.time_grid(2), torch.tensor([t_max, t_mid, 0.0]))
    g3 = obj.time_grid(3)
    assert len(g3) == 4 and g3[2].item() == pytest.approx(t_mid) and (g3.diff() < 0).all()
    noise = torch.randn(4, 2)
    assert torch.allclose(obj.prior(noise), t_max * noise)


def test_sample_step_renoises_with_fresh_noise():
    net = GaussianData(torch.tensor([2.0, -1.0]), 0.0)  # f* = μ for every input
    obj = ct()
    x = torch.randn(6, 2)
    t, zero, r = torch.full((6,), 0.9), torch.zeros(6), torch.full((6,), 0.4)
    assert torch.allclose(obj.sample_step(net, x, t, zero, None), net.mu.expand(6, 2))
    torch.manual_seed(0)
    a = obj.sample_step(net, x, t, r, None)
    torch.manual_seed(0)
    e = torch.randn(6, 2)
    assert torch.allclose(a, 0.6 * net.mu + 0.4 * e)
    assert not torch.allclose(obj.sample_step(net, x, t, r, None), a)


@pytest.mark.parametrize(
    "objective", ["consistency_training", "consistency_distillation", "ect", "meanflow", "flow_matching"]
)
def test_multistep_sampling_runs(objective):
    torch.manual_seed(0)
    kw = {"total_steps": 10} if objective == "consistency_training" else {}
    obj = OBJECTIVES.build(objective, **kw)
    net = build("test_dit", input_shape=(4, 8, 8), num_classes=3).eval()
    for nfe in (1, 2, 3):
        out = sample(obj, net, torch.randn(5, 4, 8, 8), torch.tensor([0, 1, 2, 0, 1]), nfe=nfe)
        assert out.shape == (5, 4, 8, 8) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# CLI end to end: teacher -> distilled students -> eval at 1 and 2 NFE.

TEACHER = """
seed: 1
data: {name: checkerboard}
backbone: {name: test_mlp}
objective: {name: flow_matching}
train: {steps: 6, batch_size: 32, lr: 0.001, log_every: 3, checkpoint_every: 0, num_preview: 8}
"""

STUDENT = """
seed: 2
data: {name: checkerboard}
backbone: {name: test_mlp}
objective: OBJECTIVE
train: {steps: 4, batch_size: 32, lr: 0.001, log_every: 2, checkpoint_every: 0, num_preview: 8INIT}
"""


def _train(main, tmp_path, name, text):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text)
    run = tmp_path / name
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress"]) == 0
    return run


@pytest.mark.parametrize("student", ["cd", "meanflow", "ect", "ict"])
def test_cli_distillation_end_to_end(tmp_path, capsys, student):
    from onestep.cli import main

    teacher = _train(main, tmp_path, "teacher", TEACHER)
    objective = {
        "cd": f"{{name: consistency_distillation, teacher: {teacher}, interval: zero}}",
        "meanflow": f"{{name: meanflow, teacher: {teacher}}}",
        "ect": "{name: ect, stage_steps: 2}",
        "ict": "{name: consistency_training, total_steps: 4}",
    }[student]
    init = f", init_from: {teacher}" if student in ("cd", "ect") else ""
    run = _train(main, tmp_path, student, STUDENT.replace("OBJECTIVE", objective).replace("INIT", init))
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [2, 4] and all(math.isfinite(s["loss"]) for s in stats)
    capsys.readouterr()
    assert main(["eval", str(run), "--nfe", "1", "--nfe", "2", "--num-samples", "200"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["nfe"] for r in rows} == {1, 2} and all(r["num_samples"] == 200 for r in rows)
    assert all(math.isfinite(r["value"]) for r in rows)


RESUME = """
seed: 4
data: {name: checkerboard}
backbone: {name: test_mlp}
objective: {name: consistency_training, total_steps: 8, schedule: ct, target: TARGET, s1: 20}
train: {steps: 8, batch_size: 32, lr: 0.001, log_every: 4, checkpoint_every: 0, num_preview: 8}
"""


@pytest.mark.parametrize("target", ["sg", "ema"])
def test_resume_is_exact(tmp_path, target):
    """4 + 4 resumed steps give the parameters of 8 straight steps (curricula are functions of step;
    the EMA target needs the trainer to checkpoint objective.state_dict())."""
    from onestep.cli import main
    from onestep.utils.rundir import load_checkpoint

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RESUME.replace("TARGET", target))
    straight, split = tmp_path / "a", tmp_path / "b"
    assert main(["train", str(recipe), "--run-dir", str(straight), "--no-progress"]) == 0
    assert main(["train", str(recipe), "--run-dir", str(split), "--no-progress", "train.steps=4"]) == 0
    if target == "ema":
        assert "target_net" in load_checkpoint(split)  # the loop's EMA target is checkpointed
    assert main(["train", "--resume", str(split), "--no-progress", "train.steps=8"]) == 0
    a, b = load_checkpoint(straight), load_checkpoint(split)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_multistep_renoising_is_per_sample_with_seeds():
    """With per-sample seeds, a multi-step consistency sample does not depend on its batch."""
    from onestep.sampling import seeded_noise

    torch.manual_seed(0)
    net = BACKBONES.build("test_mlp", input_shape=(2,))
    obj = OBJECTIVES.build("consistency_training", total_steps=10)
    seeds = [11, 12, 13, 14]
    noise = seeded_noise(seeds, (2,))
    batch = sample(obj, net, noise, nfe=3, seeds=seeds)
    alone = torch.cat([sample(obj, net, noise[i : i + 1], nfe=3, seeds=[s]) for i, s in enumerate(seeds)])
    torch.testing.assert_close(batch, alone)
    other = sample(obj, net, noise, nfe=3, seeds=[s + 100 for s in seeds])  # re-noising changes the result
    assert not torch.allclose(batch, other)
