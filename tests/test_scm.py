"""sCM (TrigFlow continuous-time consistency): the ϑ ↔ t maps and the velocity conversion against the
exact TrigFlow velocity of Gaussian data, the tangent (zero for the exact consistency function with
the exact teacher), the rearranged JVP against the direct JVP and finite differences, warm-up,
normalization, the learned weight, precision, samplers, and a tiny sCD run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from gaussian_closed_form import GaussianClosedForm
from torch import nn

from onestep.objectives.consistency import replayable_rng
from onestep.objectives.scm import (
    SCM,
    TrigWeightHead,
    conditional_trig_velocity,
    normalize_tangent,
    scm_jvp,
    scm_loss,
    scm_tangent,
    sigma_to_trig,
    t_to_trig,
    tangent_norm,
    tangent_warmup,
    trig_forward,
    trig_scale,
    trig_time_proposal,
    trig_to_sigma,
    trig_to_t,
    trigflow_denoise,
    trigflow_to_velocity,
    velocity_to_trigflow,
)
from onestep.registry import BACKBONES, OBJECTIVES, ConfigError
from onestep.sampling import sample
from onestep.utils.seeding import seeded_noise

DT = torch.float64
SD = 0.5

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
]


# ----------------------------------------------------------------------------------------------
# Analytic modules in the backbone contract (data x ~ N(μ, s²I)).


class GaussianVelocity(GaussianClosedForm):
    """The exact flow-matching teacher: forward = the marginal velocity v(z, t)."""

    def forward(self, z, t, h=None, y=None):
        return self.marginal_velocity(z, t)


class GaussianConsistency(GaussianClosedForm):
    """The exact consistency model read as a velocity: z − t·v = f*(z, t), the ODE map to t = 0."""

    def forward(self, z, t, h=None, y=None):
        return (z - self.flow(z, t, torch.zeros_like(t))) / t.clamp(min=1e-300)[:, None]


def trig_velocity_exact(x_theta, theta, mu, s, sigma_d=SD):
    """TrigFlow PF-ODE velocity for x ~ N(μ, s²I), derived in TrigFlow: x_ϑ has mean m = cos ϑ·μ and
    std S, S² = cos²ϑ·s² + sin²ϑ·σ_d², and dx/dϑ = m' + S'/S·(x_ϑ − m),
    S' = sin ϑ cos ϑ (σ_d² − s²)/S."""
    c, sn = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    S = torch.sqrt(c**2 * s**2 + sn**2 * sigma_d**2)
    dS = sn * c * (sigma_d**2 - s**2) / S
    return -sn * mu + dS / S * (x_theta - c * mu)


def build(name, **kw):
    return BACKBONES.build(name, **kw)


def scm(**kw):
    return OBJECTIVES.build("scm", **kw)


def thetas(n, seed=0, lo=0.05, hi=1.5):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=DT)


def randomized(net, std=0.3, seed=0):
    """Give a zero-initialized head non-trivial outputs."""
    torch.manual_seed(seed)
    for p in net.parameters():
        nn.init.normal_(p, std=std)
    return net


# ----------------------------------------------------------------------------------------------
# Time maps and conversions.


def test_time_maps_round_trip_and_match_the_paths():
    theta = torch.linspace(0, math.pi / 2, 101, dtype=DT)
    t = trig_to_t(theta, SD)
    assert t[0] == 0 and t[-1].item() == pytest.approx(1.0, abs=1e-15) and (t.diff() > 0).all()
    assert torch.allclose(t_to_trig(t, SD), theta, atol=1e-12)
    tt = torch.linspace(0, 1, 51, dtype=DT)
    assert torch.allclose(trig_to_t(t_to_trig(tt, SD), SD), tt, atol=1e-14)
    # z_t = k(ϑ) x_ϑ is onestep's (1 − t) x + t e when z = σ_d e; EDM σ = t/(1 − t) = σ_d tan ϑ.
    x, e = torch.randn(7, 3, dtype=DT), torch.randn(7, 3, dtype=DT)
    th = thetas(7)
    x_theta = torch.cos(th)[:, None] * x + torch.sin(th)[:, None] * SD * e
    t7 = trig_to_t(th, SD)[:, None]
    assert torch.allclose(trig_scale(th, SD)[:, None] * x_theta, (1 - t7) * x + t7 * e, atol=1e-14)
    assert torch.allclose(trig_to_sigma(th, SD), (t7 / (1 - t7)).squeeze(1))
    assert sigma_to_trig(80.0, SD) == pytest.approx(math.atan(160.0))
    assert torch.allclose(sigma_to_trig(trig_to_sigma(th, SD), SD), th)


def test_converted_velocity_is_the_exact_trigflow_velocity_on_gaussian_data():
    torch.manual_seed(0)
    mu, s = torch.tensor([1.0, -2.0, 0.5], dtype=DT), 0.3
    teacher = GaussianVelocity(mu, s)
    for sigma_d in (0.5, 1.0):
        th = thetas(64, seed=1, lo=0.01, hi=1.56)
        x_theta = torch.randn(64, 3, dtype=DT)
        t, k = trig_to_t(th, sigma_d), trig_scale(th, sigma_d)[:, None]
        v = teacher.marginal_velocity(k * x_theta, t)
        F = velocity_to_trigflow(v, x_theta, th, sigma_d)
        assert torch.allclose(sigma_d * F, trig_velocity_exact(x_theta, th, mu, s, sigma_d), atol=1e-12)
        # trig_forward does the same through the backbone contract.
        assert torch.allclose(trig_forward(teacher, x_theta, th, sigma_d=sigma_d), F, atol=1e-14)
        # The inverse, and the x̂ form F = (cos ϑ x_ϑ − x̂)/(σ_d sin ϑ), f = x̂ = z_t − t v.
        assert torch.allclose(trigflow_to_velocity(F, x_theta, th, sigma_d), v, atol=1e-12)
        z_t = k * x_theta
        x_hat = z_t - t[:, None] * v
        c, sn = torch.cos(th)[:, None], torch.sin(th)[:, None]
        assert torch.allclose(F, (c * x_theta - x_hat) / (sigma_d * sn), atol=1e-10)
        assert torch.allclose(trigflow_denoise(F, x_theta, th, sigma_d), x_hat, atol=1e-12)
    # And v -> F -> v for an arbitrary field.
    F = torch.randn(5, 2, 4, 4, dtype=DT)
    x_theta, th = torch.randn(5, 2, 4, 4, dtype=DT), thetas(5)
    back = velocity_to_trigflow(trigflow_to_velocity(F, x_theta, th), x_theta, th)
    assert torch.allclose(back, F, atol=1e-12)


def test_conditional_velocity_averages_to_the_marginal_one():
    """sCT's signal cos ϑ·z − sin ϑ·x averaged over the exact posterior of (x, z) given x_ϑ is the
    PF-ODE velocity (so sCT's tangent, affine in it, has the sCD tangent as its mean)."""
    g = torch.Generator().manual_seed(3)
    mu, s = torch.tensor([0.7, -0.4], dtype=DT), 0.6
    th = torch.tensor([0.3, 0.9, 1.4], dtype=DT)
    x_theta = torch.randn(3, 2, generator=g, dtype=DT)
    c, sn = torch.cos(th)[:, None], torch.sin(th)[:, None]
    S2 = c**2 * s**2 + sn**2 * SD**2
    post_mean = mu + c * s**2 / S2 * (x_theta - c * mu)
    post_std = torch.sqrt(s**2 * sn**2 * SD**2 / S2)
    n = 20000
    x = post_mean + post_std * torch.randn(n, 3, 2, generator=g, dtype=DT)
    z = (x_theta - c * x) / sn
    mean = conditional_trig_velocity(x.reshape(-1, 2), z.reshape(-1, 2), th.repeat(n)).reshape(n, 3, 2).mean(0)
    exact = trig_velocity_exact(x_theta, th, mu, s)
    assert torch.allclose(mean, exact, atol=5 * (sn * post_std / c).max().item() / math.sqrt(n) + 1e-3)


def test_time_proposal_is_the_truncated_lognormal():
    th = trig_time_proposal(40000, -1.0, 1.6, SD, 0.002, 80.0, generator=torch.Generator().manual_seed(0))
    assert th.dtype == DT and th.min() > 0 and th.max() < math.pi / 2
    log_sigma = torch.log(SD * torch.tan(th))
    assert log_sigma.mean().item() == pytest.approx(-1.0, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(1.6, abs=0.03)
    narrow = trig_time_proposal(5000, 0.0, 2.0, SD, 0.5, 2.0, generator=torch.Generator().manual_seed(1))
    sigma = SD * torch.tan(narrow)
    assert sigma.min() >= 0.5 - 1e-9 and sigma.max() <= 2.0 + 1e-9 and sigma.std() > 0.3


# ----------------------------------------------------------------------------------------------
# The tangent.


def exact_tangent_terms(student, teacher, n=32, seed=0, mode="scd", step=10**6, **kw):
    torch.manual_seed(seed)
    obj = scm(mode=mode, teacher=teacher if mode == "scd" else None, **kw)
    x = student.mu + student.s * torch.randn(n, student.mu.shape[0], dtype=DT)
    e = torch.randn_like(x)
    return obj, obj.tangent_terms(student, x, None, e=e, theta=thetas(n, seed), step=step)


def test_tangent_vanishes_for_the_exact_consistency_function_and_teacher():
    mu, s = torch.tensor([1.0, -2.0, 0.5], dtype=DT), 0.4
    student, teacher = GaussianConsistency(mu, s), GaussianVelocity(mu, s)
    _, terms = exact_tangent_terms(student, teacher)
    scale = terms["x_theta"].abs().max().item()
    assert terms["g_raw"].abs().max().item() < 1e-9 * scale
    # Each half alone is far from zero: the exact f differs from the teacher's denoiser.
    first = scm_tangent(terms["F_minus"], terms["dxdt"], terms["x_theta"], terms["jvp"], terms["theta"], SD, r=0.0)
    assert first.abs().max().item() > 1e-2
    # Tangent warm-up r < 1 no longer cancels.
    _, half = exact_tangent_terms(student, teacher, step=5000)
    assert half["r"] == 0.5 and half["g_raw"].abs().max().item() > 1e-3
    # A wrong student (s = 0.3) or a wrong teacher gives a clearly non-zero tangent.
    _, wrong = exact_tangent_terms(GaussianConsistency(mu, 0.3), teacher)
    assert wrong["g_raw"].abs().max().item() > 1e-2
    _, wrong_teacher = exact_tangent_terms(student, GaussianVelocity(mu, 0.3))
    assert wrong_teacher["g_raw"].abs().max().item() > 1e-2


def test_sct_tangent_with_the_marginal_velocity_vanishes():
    """sCT's tangent is affine in dx/dϑ; with the exact PF velocity in its place it is zero."""
    mu, s = torch.tensor([0.3, 0.8], dtype=DT), 0.7
    student = GaussianConsistency(mu, s)
    _, terms = exact_tangent_terms(student, None, mode="sct", n=16)
    x_theta, th = terms["x_theta"], terms["theta"]
    assert terms["g_raw"].abs().max().item() > 1e-3  # the conditional signal is noisy
    marginal = trig_velocity_exact(x_theta, th, mu, s)
    F_minus, jvp = scm_jvp(student, x_theta, th, marginal)
    g = scm_tangent(F_minus, marginal, x_theta, jvp, th, SD, r=1.0)
    assert g.abs().max().item() < 1e-9


@pytest.mark.parametrize("name, shape", [("test_mlp", (3,)), ("test_dit", (4, 8, 8))])
@pytest.mark.parametrize("interval", ["zero", "t"])
def test_rearranged_jvp_equals_direct_jvp_and_finite_difference(name, shape, interval):
    net = randomized(build(name, input_shape=shape, num_classes=3)).to(DT)
    n = 4
    g = torch.Generator().manual_seed(1)
    x_theta = torch.randn(n, *shape, generator=g, dtype=DT)
    dxdt = torch.randn(n, *shape, generator=g, dtype=DT)
    th, y = thetas(n, seed=2), torch.tensor([0, 1, 2, 3])
    F, jvp = scm_jvp(net, x_theta, th, dxdt, y, interval=interval)
    assert torch.allclose(F, trig_forward(net, x_theta, th, y, interval=interval), atol=1e-12)

    def fn(a, b):
        return trig_forward(net, a, b, y, interval=interval)

    from onestep.backbones.attention import jvp_attention

    with jvp_attention("explicit"):
        _, direct = torch.func.jvp(fn, (x_theta, th), (dxdt, torch.ones_like(th)))
    cs = (torch.cos(th) * torch.sin(th)).reshape(n, *[1] * len(shape))
    assert torch.allclose(jvp, cs * direct, atol=1e-10, rtol=1e-8)
    eps = 1e-6
    fd = (fn(x_theta + eps * dxdt, th + eps) - fn(x_theta - eps * dxdt, th - eps)) / (2 * eps)
    assert direct.abs().max() > 1e-2
    assert ((cs * fd - jvp).abs().max() / jvp.abs().max()).item() < 1e-7


def test_warmup_and_tangent_formula():
    assert [tangent_warmup(k, 100) for k in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0]
    assert tangent_warmup(0, 0) == 1.0 and tangent_warmup(-3, 10) == 0.0
    g = torch.Generator().manual_seed(0)
    F, dxdt, x_theta, jvp = (torch.randn(5, 3, generator=g, dtype=DT) for _ in range(4))
    th = thetas(5)
    c, sn = torch.cos(th)[:, None], torch.sin(th)[:, None]
    first = -(c**2) * (SD * F - dxdt)
    second = -(c * sn * x_theta + SD * jvp)
    assert torch.equal(scm_tangent(F, dxdt, x_theta, jvp, th, SD, r=0.0), first)
    assert torch.allclose(scm_tangent(F, dxdt, x_theta, jvp, th, SD, r=1.0), first + second)
    assert torch.allclose(scm_tangent(F, dxdt, x_theta, jvp, th, SD, r=0.3), first + 0.3 * second)


def test_normalization_both_norms():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.03, 0.04]], dtype=DT)
    assert torch.allclose(normalize_tangent(g, 0.1, "l2"), g / torch.tensor([[5.1], [0.1], [0.15]], dtype=DT))
    rms = torch.tensor([[5.0], [0.0], [0.05]], dtype=DT) / math.sqrt(2)
    assert torch.allclose(normalize_tangent(g, 0.1, "rms"), g / (rms + 0.1))
    big = torch.randn(4, 3, 8, 8, dtype=DT)
    flat = big.flatten(1).norm(dim=1)
    assert torch.allclose(tangent_norm(big, "l2"), flat)
    assert torch.allclose(normalize_tangent(big, 0.1, "rms"), big / (flat / math.sqrt(192) + 0.1)[:, None, None, None])
    with pytest.raises(ValueError, match="tangent norm"):
        normalize_tangent(g, 0.1, "linf")


# ----------------------------------------------------------------------------------------------
# The loss and the learned weight.


def test_loss_at_the_optimal_weight_is_its_minimum():
    g = torch.Generator().manual_seed(0)
    F, Fm, gt = (torch.randn(6, 5, generator=g, dtype=DT) for _ in range(3))
    d = (F - Fm - gt).square().sum(1)
    w = torch.log(d).clone().requires_grad_(True)
    loss, dd = scm_loss(F, Fm, gt, w, reduction="sum")
    assert torch.allclose(dd, d) and torch.allclose(loss, 1 + torch.log(d))
    loss.sum().backward()
    assert w.grad.abs().max().item() < 1e-12  # d/dw = 1 − e^{−w} d = 0
    for delta in (-0.1, 0.1):
        assert (scm_loss(F, Fm, gt, w.detach() + delta, reduction="sum")[0] > loss.detach()).all()
    mean_loss, dm = scm_loss(F, Fm, gt, torch.zeros(6, dtype=DT), prior=2.0, reduction="mean")
    assert torch.allclose(dm, d / 5) and torch.allclose(mean_loss, 2.0 * d / 5)


def test_weight_head_features_and_gradient_direction():
    torch.manual_seed(0)
    net = build("test_mlp", input_shape=(2,))
    obj = scm(tangent_warmup_steps=0)
    head = obj.trainable
    assert isinstance(head, TrigWeightHead) and sum(p.numel() for p in head.parameters()) == 17
    th = thetas(8)
    assert torch.allclose(head.features(th), torch.cos(2 * th[:, None] * torch.arange(1, 17)).float(), atol=1e-5)
    assert torch.equal(head(th), torch.zeros(8, dtype=torch.float32))  # zero init: weight 1
    x, e = torch.randn(8, 2), torch.randn(8, 2)
    out = obj.loss_given(net, x, None, e=e, theta=th, step=0)
    out.loss.mean().backward()
    # With the stop-gradient target the residual is −g, so d = ‖ĝ‖² and ∂loss_i/∂w_i = 1 − d_i.
    terms = obj.tangent_terms(net, x, None, e=e, theta=th, step=0)
    d = terms["g"].double().square().sum(1)
    assert (d < 1).all() and torch.allclose(out.loss.double(), d, atol=1e-6)
    dw = (1 - d) / 8
    assert torch.allclose(head.linear.bias.grad.double(), dw.sum()[None], atol=1e-6)
    assert torch.allclose(
        head.linear.weight.grad.double(), (dw[:, None] * head.features(th).double()).sum(0)[None], atol=1e-6
    )
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(q).all() for q in grads) and any(q.abs().sum() > 0 for q in grads)
    # One SGD step on the head moves w towards ln d (d < 1: w decreases).
    with torch.no_grad():
        for p in head.parameters():
            p -= 0.5 * p.grad
    assert (head(th) < 0).all()


def test_loss_formula_options_and_head_in_float64():
    torch.manual_seed(1)
    net = randomized(build("test_mlp", input_shape=(3,)), std=0.2)
    x, e, th = torch.randn(6, 3), torch.randn(6, 3), thetas(6).float()
    for kw, reduce, prior in (
        ({}, "sum", False),
        ({"tangent_norm": "rms"}, "mean", False),
        ({"loss_reduction": "mean", "prior_weighting": True}, "mean", True),
        ({"adaptive_weighting": False}, "sum", False),
    ):
        obj = scm(tangent_warmup_steps=0, **kw)
        assert obj.reduction == reduce
        if obj.trainable is not None:
            nn.init.normal_(obj.trainable.linear.weight, std=0.5)
            obj.trainable.double()  # any dtype of the head works
        else:
            assert "adaptive_weighting" in kw
        out = obj.loss_given(net, x, None, e=e, theta=th, step=0)
        g = obj.tangent_terms(net, x, None, e=e, theta=th, step=0)["g"].double()
        d = g.square().sum(1) if reduce == "sum" else g.square().mean(1)
        w = obj.weight(th).double()
        p = 1 / (SD * torch.tan(th.double())) if prior else 1.0
        assert torch.allclose(out.loss.double(), torch.exp(-w) * p * d + w, rtol=1e-5, atol=1e-6), kw
        assert out.logs["loss"] == pytest.approx(out.loss.mean().item(), rel=1e-5)


def test_ema_target_replaces_the_stop_gradient():
    torch.manual_seed(2)
    net = randomized(build("test_mlp", input_shape=(2,)), std=0.2)
    obj = scm(tangent_warmup_steps=0)
    x, e, th = torch.randn(8, 2), torch.randn(8, 2), thetas(8).float()
    sg = obj.loss_given(net, x, None, e=e, theta=th, step=0).loss
    target = copy.deepcopy(net).requires_grad_(False)
    same = obj.loss_given(net, x, None, e=e, theta=th, step=0, target_net=target).loss
    assert torch.allclose(same, sg, atol=1e-5)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = obj.loss_given(net, x, None, e=e, theta=th, step=0, target_net=target)
    assert not torch.allclose(out.loss, sg, atol=1e-3)
    out.loss.mean().backward()
    assert all(p.grad is None for p in target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_jvp_and_online_pass_share_the_dropout_mask():
    torch.manual_seed(0)
    net = BACKBONES.build("mlp_toy", input_shape=(2,), width=32, depth=2, dropout=0.5).train()
    obj = scm()
    x, e, th = torch.randn(16, 2), torch.randn(16, 2), thetas(16).float()
    with replayable_rng(x.device):
        terms = obj.tangent_terms(net, x, None, e=e, theta=th, step=0)
    online = obj.F(net, terms["x_theta"], terms["theta"], None)
    assert torch.allclose(online, terms["F_minus"], atol=1e-6)
    assert not torch.allclose(obj.F(net, terms["x_theta"], terms["theta"], None), online)


@pytest.mark.parametrize("name, shape", [("test_mlp", (2,)), ("test_dit", (4, 8, 8))])
def test_bf16_autocast_keeps_the_target_in_float32(name, shape):
    torch.manual_seed(3)
    net = randomized(build(name, input_shape=shape), std=0.1)
    obj = scm(tangent_warmup_steps=0)
    x, e, th = torch.randn(4, *shape), torch.randn(4, *shape), thetas(4).float()
    reference = obj.loss_given(net, x, None, e=e, theta=th, step=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = obj.tangent_terms(net, x, None, e=e, theta=th, step=0)
        out = obj.loss_given(net, x, None, e=e, theta=th, step=0)
        low = scm(tangent_warmup_steps=0, target_fp32=False).tangent_terms(net, x, None, e=e, theta=th, step=0)
    ref_terms = obj.tangent_terms(net, x, None, e=e, theta=th, step=0)
    for key in ("F_minus", "jvp", "g", "dxdt"):
        assert terms[key].dtype == torch.float32 and torch.equal(terms[key], ref_terms[key]), key
    assert not torch.allclose(low["F_minus"], ref_terms["F_minus"], rtol=1e-6)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss).all()
    assert torch.allclose(out.loss, reference.loss, rtol=1e-4, atol=1e-6)  # the residual is −g in both
    out.loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("name, shape", [("test_mlp", (2,)), ("test_dit", (4, 8, 8))])
@pytest.mark.parametrize("mode, guidance", [("sct", 1.0), ("scd", 1.0), ("scd", 2.0), ("scd", 3.5)])
@pytest.mark.parametrize("features", [(), (0, -1)])
def test_joint_pass_equals_the_separate_pass_in_float64(name, shape, mode, guidance, features):
    """The one-pass step (F_θ as the JVP's primal) gives the loss, the features and every gradient
    (net and weight head) of the two-pass step, to 1e-6 in float64."""
    teacher = randomized(build(name, input_shape=shape, num_classes=3), std=0.2, seed=1).double()
    teacher = teacher.eval().requires_grad_(False)
    net = randomized(build(name, input_shape=shape, num_classes=3), std=0.2, seed=2).double()
    g = torch.Generator().manual_seed(3)
    x, e = torch.randn(6, *shape, generator=g, dtype=DT), torch.randn(6, *shape, generator=g, dtype=DT)
    y, th = torch.randint(0, 3, (6,), generator=g), thetas(6)
    results = {}
    for jvp_pass in ("joint", "separate"):
        obj = scm(
            mode=mode,
            teacher=teacher if mode == "scd" else None,
            teacher_guidance=guidance,
            tangent_warmup_steps=10,
            jvp_pass=jvp_pass,
        )
        obj.trainable.double()
        torch.manual_seed(4)
        for p in obj.trainable.parameters():
            nn.init.normal_(p, std=0.1)
        out = obj.loss_given(net, x, y, e=e, theta=th, step=4, feature_blocks=features)
        total = out.loss.sum() + sum(f.square().mean() for f in out.features)
        params = list(net.parameters()) + list(obj.trainable.parameters())
        grads = torch.autograd.grad(total, params, allow_unused=True)
        results[jvp_pass] = (
            out.loss.detach(),
            [f.detach() for f in out.features],
            [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)],
        )
    (loss_a, feats_a, grads_a), (loss_b, feats_b, grads_b) = results["joint"], results["separate"]
    assert loss_a.dtype == DT and torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-12)
    assert len(feats_a) == len(features) and all(
        torch.allclose(a, b, rtol=1e-6, atol=1e-12) for a, b in zip(feats_a, feats_b)
    )
    assert any(gr.abs().sum() > 0 for gr in grads_a)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-10), (a - b).abs().max()


def test_joint_pass_is_the_default_and_falls_back_where_it_must():
    obj = scm()
    x = torch.randn(2, 2)
    assert obj.jvp_pass == "auto" and obj.joint_pass(x, None)
    assert not obj.joint_pass(x, nn.Identity())  # an EMA target: its tangent is not the online net's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not obj.joint_pass(x, None) and scm(target_fp32=False).joint_pass(x, None)
    assert scm(jvp_pass="joint").joint_pass(x, None) and not scm(jvp_pass="separate").joint_pass(x, None)


# ----------------------------------------------------------------------------------------------
# On registered backbones.


@pytest.mark.parametrize("name, shape", [("test_mlp", (2,)), ("test_dit", (4, 8, 8))])
@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_loss_shapes_features_gradients(name, shape, mode):
    torch.manual_seed(0)
    teacher = build(name, input_shape=shape, num_classes=3).eval().requires_grad_(False)
    obj = scm(mode=mode, teacher=teacher if mode == "scd" else None, teacher_guidance=2.0, interval="t")
    net = build(name, input_shape=shape, num_classes=3)
    x, y = torch.randn(8, *shape), torch.randint(0, 3, (8,))
    out = obj.loss(net, x, y, step=5, feature_blocks=(0, 1))
    assert out.loss.shape == (8,) and torch.isfinite(out.loss).all()
    assert len(out.features) == 2 and out.features[0].shape[0] == 8
    assert out.logs["warmup"] == 5e-4 and set(out.logs) >= {"loss", "distance", "logvar", "tangent_norm"}
    (out.loss.mean() + out.features[0].square().mean()).backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert obj.trainable.linear.bias.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_labels_pass_through_with_class_dropout():
    seen = []

    class Spy(nn.Module):
        num_classes = 5

        def forward(self, z, t, h=None, y=None):
            seen.append(y.clone())
            return torch.zeros_like(z)

    y = torch.arange(5).repeat(40)
    for dropout, check in ((0.0, lambda s: torch.equal(s, y)), (0.9, lambda s: (s == 5).float().mean() > 0.7)):
        for mode in ("sct", "scd"):
            seen.clear()
            scm(mode=mode, teacher=Spy() if mode == "scd" else None, class_dropout=dropout).loss(
                Spy(), torch.randn(200, 2), y, step=0
            )
            # The joint pass: one network call for the online F_θ and its tangent (plus the teacher's).
            assert len(seen) == (2 if mode == "scd" else 1) and all(check(s) for s in seen)
            assert all(torch.equal(s, seen[0]) for s in seen)  # teacher and online agree


def test_options_are_validated():
    assert isinstance(OBJECTIVES.build("scm"), SCM) and SCM.uses_jvp and SCM.stochastic_sampling
    for kw, match in (
        ({"mode": "ct"}, "mode"),
        ({"sigma_d": 0.0}, "sigma_d"),
        ({"P_std": -1.0}, "P_std"),
        ({"tangent_norm": "linf"}, "tangent_norm"),
        ({"loss_reduction": "max"}, "loss_reduction"),
        ({"tangent_c": 0.0}, "tangent_c"),
        ({"tangent_warmup_steps": -1}, "tangent_warmup_steps"),
        ({"interval": "h"}, "interval"),
        ({"theta_mid": 1.6}, "theta_mid"),
        ({"train_sigma_max": 0.001}, "train_sigma_max"),
        ({"class_dropout": 1.0}, "class_dropout"),
        ({"teacher_guidance": -1.0}, "teacher_guidance"),
        ({"weight_features": 0}, "weight_features"),
        ({"jvp_kernel": "flash"}, "jvp_kernel"),
        ({"teacher": build("test_mlp")}, "mode='scd'"),
    ):
        with pytest.raises(ValueError, match=match):
            scm(**kw)
    with pytest.raises(ConfigError, match="needs a teacher"):
        scm(mode="scd").loss(build("test_mlp"), torch.randn(4, 2), None, step=0)
    assert scm(adaptive_weighting=False).trainable is None


# ----------------------------------------------------------------------------------------------
# Sampling.


def test_time_grid_and_prior():
    obj = scm()
    t_max = 80 / 81
    t_mid = SD * math.sin(1.1) / (math.cos(1.1) + SD * math.sin(1.1))
    assert torch.allclose(obj.time_grid(1), torch.tensor([t_max, 0.0]))
    assert torch.allclose(obj.time_grid(2), torch.tensor([t_max, t_mid, 0.0]))
    theta_max = math.atan(80 / SD)
    four = [theta_max - i * (theta_max - 1.1) / 3 for i in range(4)]
    assert torch.allclose(obj.time_grid(4), trig_to_t(torch.tensor(four + [0.0], dtype=DT)).float())
    assert torch.allclose(scm(theta_mid=0.8).time_grid(2)[1], trig_to_t(torch.tensor(0.8, dtype=DT)).float())
    noise = torch.randn(4, 2)
    # The prior is the TrigFlow start σ_d sin ϑ_max·e mapped by k(ϑ_max).
    th = torch.tensor(theta_max)
    assert torch.allclose(obj.prior(noise), trig_scale(th) * SD * torch.sin(th) * noise)
    with pytest.raises(ValueError, match="nfe"):
        obj.time_grid(0)


def test_one_step_sample_is_f_at_theta_max():
    torch.manual_seed(0)
    net = randomized(build("test_dit", input_shape=(4, 8, 8), num_classes=3), std=0.1).eval()
    obj = scm()
    noise, y = torch.randn(5, 4, 8, 8), torch.tensor([0, 1, 2, 0, 3])
    out = sample(obj, net, noise, y, nfe=1)
    th = torch.full((5,), math.atan(80 / SD))
    x_theta = SD * torch.sin(th)[0] * noise
    expected = trigflow_denoise(trig_forward(net, x_theta, th, y), x_theta, th)
    assert torch.allclose(out, expected, atol=1e-5)
    t = torch.full((5,), 80 / 81)
    z = (80 / 81) * noise
    assert torch.allclose(out, z - t[:, None, None, None] * net(z, t, torch.zeros(5), y), atol=1e-5)


def test_sample_step_renoises_and_two_steps_are_per_sample_deterministic():
    mu = torch.tensor([2.0, -1.0])
    exact = GaussianConsistency(mu, 0.0)  # f* = μ for every input
    obj = scm()
    x, t, r, zero = torch.randn(6, 2), torch.full((6,), 0.9), torch.full((6,), 0.4), torch.zeros(6)
    assert torch.allclose(obj.sample_step(exact, x, t, zero, None), mu.expand(6, 2), atol=1e-6)
    e = torch.randn(6, 2)
    renoised = obj.sample_step(exact, x, t, r, None, noise=e)
    assert torch.allclose(renoised, 0.6 * mu + 0.4 * e, atol=1e-6)
    # In TrigFlow: k(ϑ_r)·(cos ϑ_r·x̂ + sin ϑ_r·σ_d e').
    th_r = t_to_trig(torch.tensor(0.4))
    assert torch.allclose(renoised, trig_scale(th_r) * (torch.cos(th_r) * mu + torch.sin(th_r) * SD * e), atol=1e-6)
    torch.manual_seed(0)
    net = build("test_mlp", input_shape=(2,))
    seeds = [11, 12, 13, 14]
    noise = seeded_noise(seeds, (2,))
    batch = sample(obj, net, noise, nfe=2, seeds=seeds)
    alone = torch.cat([sample(obj, net, noise[i : i + 1], nfe=2, seeds=[s]) for i, s in enumerate(seeds)])
    torch.testing.assert_close(batch, alone)
    torch.testing.assert_close(sample(obj, net, noise, nfe=2, seeds=seeds), batch)
    assert not torch.allclose(sample(obj, net, noise, nfe=2, seeds=[s + 100 for s in seeds]), batch)


# ----------------------------------------------------------------------------------------------
# End to end: a few dozen sCD steps with the exact teacher.


def test_scd_with_the_exact_teacher_reduces_the_one_step_error():
    torch.manual_seed(0)
    mu, s = torch.tensor([1.5, -1.0]), 0.5
    teacher, exact = GaussianVelocity(mu, s), GaussianConsistency(mu.double(), s)
    net = build("test_mlp", input_shape=(2,))
    # P_mean = 0: more high-noise times, where the 1-step map is evaluated.
    obj = scm(mode="scd", teacher=teacher, tangent_warmup_steps=0, P_mean=0.0, P_std=1.6)
    opt = torch.optim.Adam(list(net.parameters()) + list(obj.trainable.parameters()), lr=3e-3)
    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(5))
    target = exact.flow((80 / 81) * noise.double(), torch.full((512,), 80 / 81, dtype=DT), torch.zeros(512, dtype=DT))

    def error():
        return (sample(obj, net, noise, nfe=1).double() - target).square().sum(1).mean().item()

    before = error()
    for step in range(40):
        x = mu + s * torch.randn(256, 2)
        out = obj.loss(net, x, None, step=step)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    after = error()
    # From ~3.5 (the net outputs ~0) to well below s²·D = 0.5, the error of the best constant (μ).
    assert after < 0.1 * before and after < 0.25, (before, after)
