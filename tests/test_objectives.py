"""Closed-form checks of the flow-matching and MeanFlow objectives (CPU, float64 where it matters)."""

from __future__ import annotations

import math

import pytest
import torch
from gaussian_closed_form import GaussianClosedForm
from torch import nn

from onestep.objectives import FlowMatching, LossOutput, MeanFlow
from onestep.objectives.common import adaptive_weight, cfg_velocity, drop_labels, velocity
from onestep.objectives.meanflow import meanflow_jvp, meanflow_target
from onestep.objectives.time_sampling import logit_normal, num_r_neq_t, sample_t_r, uniform
from onestep.registry import BACKBONES, OBJECTIVES, ConfigError

DT = torch.float64

# torch's forward-AD decompositions call the deprecated torch.jit.script when first loaded.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


# ----------------------------------------------------------------------------------------------
# Small analytic / smooth modules in the backbone contract.


class SmoothNet(nn.Module):
    """A small smooth MLP u(x, t, h, y) on (B, D) inputs; feature = the hidden layer."""

    def __init__(self, dim: int = 3, width: int = 16, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.inp = nn.Linear(dim + 2, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, dim)
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.calls = 0

    def forward_features(self, x, t, h=None, y=None, *, blocks=()):
        self.calls += 1
        h = torch.zeros_like(t) if h is None else h
        a = torch.tanh(self.inp(torch.cat([x, t[:, None], h[:, None]], dim=1)))
        if self.label is not None:
            ids = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y
            a = a + self.label(ids)
        a = torch.tanh(self.hidden(a))
        feats = [a for _ in blocks]
        return self.out(a) * (1 + t[:, None] * h[:, None]) + torch.sin(3 * t)[:, None] * x, feats

    def forward(self, x, t, h=None, y=None):
        return self.forward_features(x, t, h, y, blocks=())[0]


class GaussianMeanFlow(GaussianClosedForm):
    """Exact average velocity u(z, r, t) for data x ~ N(μ, s²I) (docs/reference.md, "Closed forms for
    tests"), as u(z, t, h).

    With σ(t)² = (1 − t)²s² + t², z_r = m(r) + σ(r)/σ(t)·(z − m(t)), m(t) = (1 − t)μ:
    u = (z − z_r)/(t − r) = −μ + (z − m(t))·[(t + r) − s²(2 − t − r)] / (σ(t)(σ(t) + σ(r))),
    which has no 0/0 at r = t (it equals the marginal velocity v(z, t) there).
    """

    def forward(self, z, t, h=None, y=None):
        h = torch.zeros_like(t) if h is None else h
        r = t - h
        st, sr = self.sigma(t), self.sigma(r)
        ratio = ((t + r) - self.s**2 * (2 - t - r)) / (st * (st + sr))
        return -self.mu + (z - (1 - t)[:, None] * self.mu) * ratio[:, None]


def u_of(net, z, r, t, y=None):
    """u in (z, r, t) coordinates."""
    return net(z, t, t - r, y)


def central_difference(net, z, r, t, v, y=None, eps=1e-6):
    """Directional derivative of u(z, r, t) along (v, 0, 1)."""
    plus = u_of(net, z + eps * v, r, t + eps, y)
    minus = u_of(net, z - eps * v, r, t - eps, y)
    return (plus - minus) / (2 * eps)


def batch(n=6, dim=3, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    e = torch.randn(n, dim, generator=g, dtype=dtype)
    t = 0.2 + 0.7 * torch.rand(n, generator=g, dtype=dtype)
    r = t * torch.rand(n, generator=g, dtype=dtype)
    return x, e, t, r


# ----------------------------------------------------------------------------------------------
# The JVP.


def test_meanflow_jvp_equals_central_difference_in_z_r_t():
    torch.manual_seed(0)
    net = SmoothNet().to(DT)
    x, e, t, r = batch()
    z = (1 - t[:, None]) * x + t[:, None] * e
    v = e - x
    u, dudt, _ = meanflow_jvp(net, z, t, t - r, v, None)
    assert torch.allclose(u, u_of(net, z, r, t), atol=1e-12)
    fd = central_difference(net, z, r, t, v)
    assert dudt.abs().max() > 1e-2  # not trivially zero
    assert torch.allclose(dudt, fd, atol=1e-7, rtol=1e-6)


def test_meanflow_loss_uses_tangent_v_0_1():
    """The whole loss (p = 0) equals Σ(u − (v − (t − r)·du/dt))² with du/dt by finite differences."""
    torch.manual_seed(1)
    net = SmoothNet().to(DT)
    x, e, t, r = batch(seed=1)
    objective = MeanFlow(adaptive_p=0.0)
    out = objective.loss_given(net, x, None, e=e, t=t, r=r)
    z = (1 - t[:, None]) * x + t[:, None] * e
    v = e - x
    target = v - (t - r)[:, None] * central_difference(net, z, r, t, v)
    expected = ((u_of(net, z, r, t) - target) ** 2).sum(1)
    assert isinstance(out, LossOutput) and out.loss.shape == (6,)
    assert torch.allclose(out.loss, expected, rtol=1e-7, atol=1e-9)
    # A wrong tangent (dt = 0) gives a measurably different loss.
    wrong = v - (t - r)[:, None] * (u_of(net, z + 1e-6 * v, r, t) - u_of(net, z - 1e-6 * v, r, t)) / 2e-6
    assert not torch.allclose(out.loss, ((u_of(net, z, r, t) - wrong) ** 2).sum(1), rtol=1e-3)


def test_meanflow_target_formula():
    g = torch.Generator().manual_seed(0)
    v, dudt = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    t = torch.tensor([0.9, 0.5, 0.3, 1.0])
    r = torch.tensor([0.1, 0.5, 0.4, 0.0])  # third has t < r: clipped to 0
    target = meanflow_target(v, dudt, t, r)
    h = torch.tensor([0.8, 0.0, 0.0, 1.0]).reshape(4, 1, 1)
    assert torch.allclose(target, v - h * dudt)
    assert target.dtype == torch.float32 and not target.requires_grad
    assert meanflow_target(v.bfloat16(), dudt.bfloat16(), t, r).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# r = t is flow matching.


def test_r_equals_t_target_is_v_and_loss_is_flow_matching():
    torch.manual_seed(2)
    net = SmoothNet().to(DT)
    x, e, t, _ = batch(seed=2)
    v = e - x
    assert torch.equal(meanflow_target(v, torch.randn_like(v), t, t), v)
    for p in (0.0, 1.0, 0.75):
        mf = MeanFlow(adaptive_p=p, adaptive_c=1e-3).loss_given(net, x, None, e=e, t=t, r=t)
        fm = FlowMatching(adaptive_p=p, adaptive_c=1e-3).loss_given(net, x, None, e=e, t=t)
        assert torch.allclose(mf.loss, fm.loss, rtol=1e-10)
        assert mf.logs["mse"] == pytest.approx(fm.logs["mse"], rel=1e-10)


def test_ratio_zero_gives_r_equals_t_in_loss_sampling():
    t, r = MeanFlow(ratio_r_neq_t=0.0).sample_t_r(1000)
    assert torch.equal(t, r)


def test_flow_matching_loss_formula():
    torch.manual_seed(3)
    net = SmoothNet().to(DT)
    x, e, t, _ = batch(seed=3)
    out = FlowMatching().loss_given(net, x, None, e=e, t=t)
    z = (1 - t[:, None]) * x + t[:, None] * e
    expected = ((net(z, t, torch.zeros_like(t)) - (e - x)) ** 2).sum(1)
    assert torch.allclose(out.loss, expected)
    assert out.logs["mse"] == pytest.approx(float(expected.detach().mean()))
    assert not any(k.startswith("loss") for k in out.logs)  # loss names belong to the training step
    # Random path end to end.
    full = FlowMatching(time_dist="uniform").loss(net, x, None, step=0)
    assert full.loss.shape == (6,) and torch.isfinite(full.loss).all()


# ----------------------------------------------------------------------------------------------
# Gaussian closed form.

MU = torch.tensor([1.5, -2.0, 0.5], dtype=DT)
S = 0.6


def test_gaussian_exact_u_limits_and_flow_map():
    net = GaussianMeanFlow(MU, S)
    x, e, t, r = batch(n=16, seed=4)
    z = (1 - t[:, None]) * x + t[:, None] * e
    # u(z, t, t) is the marginal velocity.
    assert torch.allclose(net(z, t, torch.zeros_like(t)), net.marginal_velocity(z, t), atol=1e-12)
    # u = (z − z_r)/(t − r) with the exact flow map.
    sig = net.sigma
    z_r = (1 - r)[:, None] * MU + (sig(r) / sig(t))[:, None] * (z - (1 - t)[:, None] * MU)
    assert torch.allclose(net(z, t, t - r), (z - z_r) / (t - r)[:, None], atol=1e-10)


def test_gaussian_exact_u_satisfies_meanflow_identity():
    """Target from the exact u with ṽ = marginal velocity (the teacher hook) equals u: loss ~ 0."""
    net = GaussianMeanFlow(MU, S)
    x, e, t, r = batch(n=64, seed=5)
    t = t.clamp(0.02, 0.98)
    z = (1 - t[:, None]) * x + t[:, None] * e
    v = net.marginal_velocity(z, t)
    u, dudt, _ = meanflow_jvp(net, z, t, t - r, v, None)
    assert dudt.abs().max() > 0.1  # the correction is not trivially zero
    assert torch.allclose(meanflow_target(v, dudt, t, r), u, atol=1e-12)
    # Through the objective, with the exact marginal velocity as teacher (distillation hook).
    teacher = GaussianMeanFlow(MU, S)
    objective = MeanFlow(teacher=teacher, adaptive_p=0.0, ratio_r_neq_t=1.0)
    out = objective.loss_given(net, x, None, e=e, t=t, r=r)
    assert out.loss.max() < 1e-20
    # With the conditional velocity e − x instead, the loss is clearly nonzero.
    assert MeanFlow(adaptive_p=0.0).loss_given(net, x, None, e=e, t=t, r=r).loss.mean() > 1e-2
    # Full random path, teacher included.
    assert objective.loss(net, x, None, step=0).loss.max() < 1e-20


def test_gaussian_model_tangent_leaves_only_the_velocity_noise():
    """jvp_tangent="model" on the exact u: du/dt is taken along the exact marginal velocity
    u(z, t, 0), so u_tgt − u = v − v(z, t) exactly; the sample tangent adds (t − r)·∂_z u·(v − v(z, t))."""
    net = GaussianMeanFlow(MU, S)
    x, e, t, r = batch(n=64, seed=6)
    t, r = t.clamp(0.05, 0.98), r.clamp(0.0, 0.5)
    r = torch.minimum(r, t - 0.02)
    z = (1 - t[:, None]) * x + t[:, None] * e
    noise = ((e - x) - net.marginal_velocity(z, t)).pow(2).sum(1)
    model = MeanFlow(adaptive_p=0.0, jvp_tangent="model").loss_given(net, x, None, e=e, t=t, r=r).loss
    torch.testing.assert_close(model, noise, rtol=1e-9, atol=1e-12)
    sample = MeanFlow(adaptive_p=0.0).loss_given(net, x, None, e=e, t=t, r=r).loss
    assert (sample - noise).abs().max() > 1e-2


def test_model_tangent_uses_the_nets_guided_velocity_on_r_neq_t_only():
    torch.manual_seed(0)
    net = BACKBONES.build("test_mlp", input_shape=(2,), num_classes=3).double()
    z, v = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    t = torch.full((6,), 0.7, dtype=torch.float64)
    r = torch.tensor([0.7, 0.2, 0.7, 0.1, 0.3, 0.7], dtype=torch.float64)
    y = torch.tensor([0, 1, 3, 3, 2, 1])  # 3 = null class
    obj = MeanFlow(jvp_tangent="model", cfg_omega=1.5, cfg_kappa=0.2)
    out = obj.model_tangent(net, z, t, r, y, v)
    with torch.no_grad():
        cond = net(z, t, torch.zeros_like(t), y)
        null = net(z, t, torch.zeros_like(t), torch.full_like(y, 3))
    expected = v.clone()
    for i in (1, 4):  # guided (label kept): (ω + κ)·u(c) + (1 − ω − κ)·u(∅)
        expected[i] = 1.7 * cond[i] - 0.7 * null[i]
    expected[3] = cond[3]  # dropped label: the null-class velocity
    torch.testing.assert_close(out, expected)


def test_model_tangent_reuses_the_guided_velocities():
    """In the loss, the guided samples' u_θ(·|c), u_θ(·|∅) computed for ṽ serve the model tangent
    too: same tangent as computing it afresh, and fewer rows through the net."""
    torch.manual_seed(0)
    net = BACKBONES.build("test_mlp", input_shape=(2,), num_classes=3).double()
    n = 12
    z, v = torch.randn(n, 2, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
    t = torch.rand(n, dtype=torch.float64) * 0.8 + 0.2
    r = torch.where(torch.arange(n) % 2 == 0, t, t * 0.3)
    y = torch.tensor([0, 1, 3, 3, 2, 1, 0, 3, 2, 2, 1, 0])  # 3 = null class
    obj = MeanFlow(jvp_tangent="model", cfg_omega=1.5, cfg_kappa=0.2, cfg_t_start=0.3, cfg_t_end=0.9)
    rows = []

    class Counting(torch.nn.Module):
        num_classes = 3

        def __init__(self):
            super().__init__()
            self.inner = net

        def forward(self, *args):
            rows.append(args[0].shape[0])
            return self.inner(*args)

    counted = Counting()
    v_tilde, guided, outputs = obj.guided_velocity(counted, z, t, v, y, return_outputs=True)
    assert outputs is not None and bool(guided.any())
    calls_before = sum(rows)
    reused = obj.model_tangent(counted, z, t, r, y, v_tilde, guided_outputs=outputs)
    fresh = obj.model_tangent(net, z, t, r, y, v_tilde)
    torch.testing.assert_close(reused, fresh)
    moving = t != r
    n_reused = int((moving & guided).sum())
    assert n_reused > 0 and sum(rows) - calls_before == int(moving.sum()) - n_reused


def test_gaussian_one_step_map_hits_the_data_distribution():
    net = GaussianMeanFlow(MU, S)
    e = torch.randn(200_000, 3, generator=torch.Generator().manual_seed(6), dtype=DT)
    one = torch.ones(e.shape[0], dtype=DT)
    x = e - net(e, one, one)
    assert torch.allclose(x, MU + S * e, atol=1e-12)
    assert torch.allclose(x.mean(0), MU, atol=0.01)
    assert torch.allclose(x.std(0), torch.full((3,), S, dtype=DT), atol=0.01)
    # The objective's sampler step is the same map.
    assert torch.allclose(MeanFlow().sample_step(net, e, 1.0, 0.0, None), x)
    # Two steps 1 → 0.5 → 0 of the exact flow map land at the same place.
    grid = MeanFlow().time_grid(2)
    assert torch.allclose(grid, torch.tensor([1.0, 0.5, 0.0]))
    z = e
    for a, b in zip(grid[:-1], grid[1:]):
        z = MeanFlow().sample_step(net, z, float(a), float(b), None)
    assert torch.allclose(z, x, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Pure functions and time sampling.


def test_adaptive_weight():
    l = torch.tensor([0.0, 0.5, 2.0, 10.0], requires_grad=True)
    w = adaptive_weight(l, 0.75, 1e-3)
    assert torch.allclose(w, 1 / (l.detach() + 1e-3) ** 0.75)
    assert not w.requires_grad  # stop-gradient on the weight
    (w * l).sum().backward()
    assert torch.allclose(l.grad, w)
    assert torch.equal(adaptive_weight(l, 0.0, 0.01), torch.ones(4))
    with pytest.raises(ValueError, match=r"adaptive_p must be in \[0, inf\)"):
        adaptive_weight(l, -1.0, 0.01)
    with pytest.raises(ValueError, match="adaptive_c"):
        MeanFlow(adaptive_c=0.0)


def test_logit_normal_and_uniform_moments():
    g = torch.Generator().manual_seed(0)
    t = logit_normal(200_000, -0.4, 1.0, generator=g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.4) < 0.01 and abs(logit.std().item() - 1.0) < 0.01
    u = uniform(200_000, generator=g)
    assert abs(u.mean().item() - 0.5) < 0.005 and 0 <= u.min() and u.max() < 1


def test_sample_t_r_sort_statistics():
    n = 100_000
    t, r = sample_t_r(n, generator=torch.Generator().manual_seed(1))
    neq = t != r
    assert int(neq.sum()) == num_r_neq_t(n, 0.25) == 25_000
    assert (r <= t).all() and (t <= 1).all() and (r >= 0).all()
    # The unordered pair is two i.i.d. logit-normal(−0.4, 1) draws.
    both = torch.cat([t[neq], r[neq]])
    logit = torch.log(both / (1 - both))
    assert abs(logit.mean().item() + 0.4) < 0.02 and abs(logit.std().item() - 1.0) < 0.02
    # t = max of the pair: its mean logit is above the mean.
    assert torch.log(t[neq] / (1 - t[neq])).mean() > 0.0


def test_sample_t_r_clip_statistics():
    n = 100_000
    t, r = sample_t_r(
        n,
        mean_t=-0.6,
        std_t=1.6,
        mean_r=-4.0,
        std_r=1.6,
        ratio_r_neq_t=0.75,
        pairing="clip",
        generator=torch.Generator().manual_seed(2),
    )
    assert (r <= t).all()
    logit_t = torch.log(t / (1 - t))  # t keeps its own distribution under "clip"
    assert abs(logit_t.mean().item() + 0.6) < 0.03 and abs(logit_t.std().item() - 1.6) < 0.03
    # 75 % selected; those whose r draw exceeds t are clipped back to r = t.
    p_r_above_t = 0.5 * (1 + math.erf((-4.0 + 0.6) / (1.6 * math.sqrt(2) * math.sqrt(2))))
    share = (t != r).float().mean().item()
    assert abs(share - 0.75 * (1 - p_r_above_t)) < 0.005


def test_sample_t_r_counts_and_errors():
    assert num_r_neq_t(10, 0.3) == 3 and num_r_neq_t(5, 0.5) == 3 and num_r_neq_t(4, 1.0) == 4
    assert num_r_neq_t(7, 0.0) == 0
    t, r = sample_t_r(8, ratio_r_neq_t=1.0, dist="uniform")
    assert (t > r).all()
    with pytest.raises(ValueError, match=r"ratio_r_neq_t .* must be in \[0, 1\]"):
        sample_t_r(8, ratio_r_neq_t=1.5)
    with pytest.raises(ValueError, match="pairing"):
        sample_t_r(8, pairing="max")
    with pytest.raises(ValueError, match=r"ratio_r_neq_t"):
        MeanFlow(ratio_r_neq_t=-0.1)


def test_drop_labels():
    y = torch.arange(10).repeat(1000)
    dropped = drop_labels(y, 10, 0.1, generator=torch.Generator().manual_seed(0))
    frac = (dropped == 10).float().mean().item()
    assert abs(frac - 0.1) < 0.01
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])
    assert drop_labels(y, 0, 0.1) is y and drop_labels(None, 10, 0.1) is None


# ----------------------------------------------------------------------------------------------
# CFG folded into training.


def test_cfg_velocity_formula():
    g = torch.Generator().manual_seed(0)
    v, uc, uu = (torch.randn(5, 3, generator=g) for _ in range(3))
    out = cfg_velocity(v, uc, uu, 0.2, 0.92)
    assert torch.allclose(out, 0.2 * v + 0.92 * uc + (1 - 0.2 - 0.92) * uu)
    assert MeanFlow(cfg_omega=0.2, cfg_kappa=0.92).cfg_effective_scale == pytest.approx(2.5)
    # ω = 1, κ = 0: ṽ = v.
    assert torch.equal(cfg_velocity(v, uc, uu, 1.0, 0.0), v)


def test_guided_velocity_only_kept_labels_inside_window():
    torch.manual_seed(3)
    net = SmoothNet(num_classes=4).to(DT)
    n = 8
    x, e, _, _ = batch(n=n, seed=3)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.4, 0.5, 0.25], dtype=DT)
    y = torch.tensor([0, 1, 4, 2, 3, 4, 1, 2])  # 4 = null (dropped)
    z = (1 - t[:, None]) * x + t[:, None] * e
    v = e - x
    omega, kappa = 0.6, 0.3
    objective = MeanFlow(cfg_omega=omega, cfg_kappa=kappa, cfg_t_start=0.25, cfg_t_end=0.7)
    net.calls = 0
    v_tilde, guided = objective.guided_velocity(net, z, t, v, y)
    assert net.calls == 1  # one batched call for cond + uncond
    expected_mask = torch.tensor([False, True, False, True, False, False, True, True])
    assert torch.equal(guided, expected_mask)
    zero = torch.zeros_like(t)
    mixed = cfg_velocity(v, net(z, t, zero, y), net(z, t, zero, torch.full_like(y, 4)), omega, kappa)
    assert torch.allclose(v_tilde[expected_mask], mixed[expected_mask])
    assert torch.equal(v_tilde[~expected_mask], v[~expected_mask])  # dropped or outside: ṽ = v
    assert not torch.allclose(v_tilde[expected_mask], v[expected_mask])
    # Off (ω = 1, κ = 0) or unconditional: no extra calls.
    net.calls = 0
    same, none = MeanFlow().guided_velocity(net, z, t, v, y)
    assert same is v and none is None and net.calls == 0
    uncond = SmoothNet(num_classes=0).to(DT)
    same, none = objective.guided_velocity(uncond, z, t, v, None)
    assert same is v and uncond.calls == 0


def test_guided_velocity_is_tangent_and_target():
    """With CFG on, the loss equals Σ(u − (ṽ − h·du/dt))² with du/dt along (ṽ, 0, 1)."""
    torch.manual_seed(4)
    net = SmoothNet(num_classes=4).to(DT)
    x, e, t, r = batch(n=8, seed=4)
    y = torch.tensor([0, 1, 4, 2, 3, 4, 1, 2])
    objective = MeanFlow(cfg_omega=0.5, cfg_kappa=0.4, adaptive_p=0.0)
    out = objective.loss_given(net, x, y, e=e, t=t, r=r)
    z = (1 - t[:, None]) * x + t[:, None] * e
    v_tilde, _ = objective.guided_velocity(net, z, t, e - x, y)
    target = v_tilde - (t - r)[:, None] * central_difference(net, z, r, t, v_tilde, y)
    expected = ((u_of(net, z, r, t, y) - target) ** 2).sum(1)
    assert torch.allclose(out.loss, expected, rtol=1e-7, atol=1e-9)
    assert out.logs["guided_fraction"] == pytest.approx(6 / 8)


def test_cfg_kwargs_validated():
    with pytest.raises(ValueError, match=r"cfg_kappa must be in \[0, 1\)"):
        MeanFlow(cfg_kappa=1.0)
    with pytest.raises(ValueError, match="cfg_t_end"):
        MeanFlow(cfg_t_start=0.8, cfg_t_end=0.3)
    with pytest.raises(ValueError, match="class_dropout"):
        FlowMatching(class_dropout=1.0)


# ----------------------------------------------------------------------------------------------
# Features and gradients.


def test_features_from_jvp_primal_carry_gradients():
    torch.manual_seed(5)
    net = SmoothNet().to(DT)
    x, e, t, r = batch(n=8, seed=5)
    out = MeanFlow(ratio_r_neq_t=1.0).loss_given(net, x, None, e=e, t=t, r=r, feature_blocks=(0,))
    (feat,) = out.features
    z = (1 - t[:, None]) * x + t[:, None] * e
    _, (reference,) = net.forward_features(z, t, t - r, None, blocks=(0,))
    assert torch.allclose(feat, reference)  # same pass, same values
    assert feat.requires_grad
    grads = torch.autograd.grad(feat.pow(2).sum(), [net.inp.weight, net.hidden.weight], retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    # The backward through the JVP's primal u equals the backward of a plain forward with the same
    # (detached) target.
    params = list(net.parameters())
    g_loss = torch.autograd.grad(out.loss.sum(), params)
    v = e - x
    _, dudt, _ = meanflow_jvp(net, z, t, t - r, v, None)
    target = meanflow_target(v, dudt, t, r).to(DT)
    plain = ((net(z, t, t - r) - target) ** 2).sum(1)
    plain = plain / (plain.detach() + 0.01)
    g_plain = torch.autograd.grad(plain.sum(), params)
    for a, b in zip(g_loss, g_plain):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_flow_matching_features_carry_gradients():
    net = SmoothNet().to(DT)
    x, e, t, _ = batch(seed=6)
    out = FlowMatching().loss_given(net, x, None, e=e, t=t, feature_blocks=(0,))
    assert out.features[0].requires_grad
    assert torch.autograd.grad(out.features[0].sum(), net.hidden.weight)[0].abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Samplers.


def test_sampler_steps():
    torch.manual_seed(7)
    net = SmoothNet(num_classes=4).to(DT)
    x, _, _, _ = batch(seed=7)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    one = torch.ones(6, dtype=DT)
    # MeanFlow 1-NFE: e − u(e, t=1, h=1).
    assert torch.allclose(MeanFlow().sample_step(net, x, 1.0, 0.0, y), x - net(x, one, one, y))
    # MeanFlow step t → r: z − (t − r)·u(z, t, t − r).
    t, r = 0.8 * one, 0.3 * one
    assert torch.allclose(MeanFlow().sample_step(net, x, t, r, y), x - 0.5 * net(x, t, t - r, y))
    # Flow matching Euler with h = 0, with and without guidance.
    zero = torch.zeros(6, dtype=DT)
    assert torch.allclose(FlowMatching().sample_step(net, x, 0.8, 0.3, y), x - 0.5 * net(x, t, zero, y))
    cond, uncond = net(x, t, zero, y), net(x, t, zero, torch.full_like(y, 4))
    guided = FlowMatching(guidance_scale=3.0).sample_step(net, x, 0.8, 0.3, y)
    assert torch.allclose(guided, x - 0.5 * (uncond + 3.0 * (cond - uncond)))
    assert torch.allclose(velocity(net, x, 0.8, y), cond)
    assert not torch.is_grad_enabled() or not velocity(net, x, 0.8, y).requires_grad


# ----------------------------------------------------------------------------------------------
# Precision and registry.


def test_target_fp32_under_autocast():
    torch.manual_seed(8)
    net = SmoothNet()
    x, e, t, r = batch(n=8, seed=8, dtype=torch.float32)
    reference = MeanFlow().loss_given(net, x, None, e=e, t=t, r=r)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = MeanFlow().loss_given(net, x, None, e=e, t=t, r=r)
        low = MeanFlow(target_fp32=False).loss_given(net, x, None, e=e, t=t, r=r)
    assert fp32.loss.dtype == torch.float32 and torch.allclose(fp32.loss, reference.loss)
    assert low.loss.dtype == torch.float32 and torch.isfinite(low.loss).all()
    assert not torch.allclose(low.loss, reference.loss, rtol=1e-6)


def _load_registries():
    try:
        OBJECTIVES.names()
    except ModuleNotFoundError:  # another component package not written yet
        pass


def test_registry_builds_and_validates():
    _load_registries()
    assert {"meanflow", "flow_matching"} <= set(OBJECTIVES._factories)
    objective = OBJECTIVES.build("meanflow", ratio_r_neq_t=0.5, pairing="clip", cfg_omega=1, adaptive_p=0.75)
    assert isinstance(objective, MeanFlow) and objective.uses_jvp
    assert objective.ratio_r_neq_t == 0.5 and objective.pairing == "clip"
    assert isinstance(OBJECTIVES.build("flow_matching"), FlowMatching)
    with pytest.raises(ConfigError, match="ratio_r_neq_t"):
        OBJECTIVES.bind("meanflow", {"ratio_r_neq_t": "a quarter"})
    with pytest.raises(ConfigError, match="pairing"):
        OBJECTIVES.bind("meanflow", {"pairing": "max"})
    with pytest.raises(ConfigError, match="unknown key 'ratio'"):
        OBJECTIVES.bind("meanflow", {"ratio": 0.25})


# ----------------------------------------------------------------------------------------------
# Real backbones.


def _backbone(name, **kw):
    _load_registries()
    if name not in BACKBONES._factories:
        pytest.skip(f"backbone {name} not registered yet")
    torch.manual_seed(0)
    net = BACKBONES.build(name, **kw)
    with torch.no_grad():  # leave adaLN-zero init so every parameter gets a gradient
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("name, shape", [("test_dit", (4, 8, 8)), ("test_mlp", (2,))])
@pytest.mark.parametrize(
    "objective",
    [
        MeanFlow(cfg_omega=1.0, cfg_kappa=0.5, ratio_r_neq_t=0.5),
        FlowMatching(adaptive_p=0.5),
    ],
)
def test_losses_on_registered_backbones(name, shape, objective):
    net = _backbone(name, input_shape=shape, num_classes=10)
    x = torch.randn(6, *shape)
    y = torch.randint(0, 10, (6,))
    out = objective.loss(net, x, y, step=0, feature_blocks=(0, -1))
    assert out.loss.shape == (6,) and torch.isfinite(out.loss).all()
    assert len(out.features) == 2 and all(f.requires_grad for f in out.features)
    total = out.loss.mean() + sum(f.pow(2).mean() for f in out.features)
    total.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, missing
    sample = objective.sample_step(net, torch.randn(6, *shape), 1.0, 0.0, y)
    assert sample.shape == (6, *shape) and torch.isfinite(sample).all()


def test_dit_jvp_matches_finite_difference():
    net = _backbone("test_dit", input_shape=(4, 8, 8), num_classes=10).to(DT)
    g = torch.Generator().manual_seed(9)
    z, v = torch.randn(3, 4, 8, 8, generator=g, dtype=DT), torch.randn(3, 4, 8, 8, generator=g, dtype=DT)
    t, r = torch.tensor([0.9, 0.6, 0.4], dtype=DT), torch.tensor([0.1, 0.6, 0.2], dtype=DT)
    y = torch.tensor([1, 10, 3])
    _, dudt, _ = meanflow_jvp(net, z, t, t - r, v, y)
    fd = central_difference(net, z, r, t, v, y)
    assert torch.allclose(dudt, fd, atol=1e-6, rtol=1e-5)


def test_jvp_only_on_r_neq_t_equals_full_jvp():
    """The subset JVP (plain forward where r = t) and the fused attention JVP rule give the same loss,
    gradients and features as the plain path (full-batch JVP through explicit softmax attention)."""
    torch.manual_seed(0)
    net = BACKBONES.build("test_dit", input_shape=(4, 8, 8), num_classes=10).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, e = torch.randn(8, 4, 8, 8, dtype=torch.float64), torch.randn(8, 4, 8, 8, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64)
    r = torch.where(torch.arange(8) % 3 == 0, t * 0.3, t)  # 3 of 8 with r != t
    y = torch.randint(0, 11, (8,))
    results = []
    configs = [
        (False, "explicit", "joint"),
        (True, "fused", "joint"),
        (False, "fused", "joint"),
        (True, "explicit", "joint"),
        (True, "sdpa_math", "joint"),
        (True, "fused", "separate"),
        (False, "explicit", "separate"),
    ]
    for subset, kernel, jvp_pass in configs:
        obj = OBJECTIVES.build(
            "meanflow", jvp_only_r_neq_t=subset, jvp_kernel=kernel, cfg_omega=1.0, cfg_kappa=0.5, jvp_pass=jvp_pass
        )
        net.zero_grad()
        out = obj.loss_given(net, x, y, e=e, t=t, r=r, feature_blocks=(0, 1))
        (out.loss.sum() + out.features[0].square().mean()).backward()
        results.append(
            (out.loss.detach(), [f.detach() for f in out.features], [p.grad.clone() for p in net.parameters()])
        )
    (la, fa, ga) = results[0]
    assert la.abs().max() > 0 and any(g.abs().max() > 0 for g in ga)
    for lb, fb, gb in results[1:]:
        torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-12)
        for a, b in zip(fa, fb):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    with pytest.raises(ConfigError, match="jvp_kernel. must be one of"):
        OBJECTIVES.build("meanflow", jvp_kernel="flash")


def test_bf16_plain_forward_stays_bf16_while_the_jvp_is_fp32():
    """target_fp32 turns autocast off for the target side (guided velocity, tangent, JVP) only: the
    r = t samples' plain forward keeps the ambient bf16 autocast."""
    torch.manual_seed(0)
    net = BACKBONES.build("test_mlp", input_shape=(2,))
    seen = []
    hook = net.blocks[0].fc1.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[0], o.dtype)))
    obj = OBJECTIVES.build("meanflow", ratio_r_neq_t=0.25)
    x = torch.randn(16, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj.loss(net, x, None, step=0)
    hook.remove()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss).all()
    assert sorted(seen) == [(4, torch.float32), (12, torch.bfloat16)]  # JVP on 4 samples in fp32, 12 plain in bf16
    out.loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_separate_jvp_pass_falls_back_with_dropout():
    from onestep.objectives.meanflow import has_active_dropout

    net = BACKBONES.build("test_dit", input_shape=(4, 8, 8), dropout=0.1)
    assert has_active_dropout(net.train()) and not has_active_dropout(net.eval())
    assert not has_active_dropout(BACKBONES.build("test_dit", input_shape=(4, 8, 8)).train())
    calls = []
    obj = OBJECTIVES.build("meanflow", jvp_pass="separate")
    real = obj.u_and_dudt_separate
    obj.u_and_dudt_separate = lambda *a, **k: calls.append(1) or real(*a, **k)
    obj.loss(net.train(), torch.randn(8, 4, 8, 8), None, step=0)
    assert not calls  # dropout active: the joint pass
    obj.loss(net.eval(), torch.randn(8, 4, 8, 8), None, step=0)
    assert calls == [1]
