"""Improved MeanFlow: closed forms on Gaussian data, the guided target, JVP numerics against an
independent transcription of the reference code, the sampler with guidance inputs, and guidance
through eval / compare / plot (CPU, float64 where it matters)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from gaussian_closed_form import GaussianClosedForm
from torch import nn

from onestep.backbones.attention import jvp_attention
from onestep.backbones.layers import GUIDANCE_KEYS
from onestep.cli import main
from onestep.objectives import ImprovedMeanFlow, imf_jvp
from onestep.objectives.common import cfg_velocity
from onestep.objectives.improved_meanflow import guided_target, sample_interval, sample_omega
from onestep.registry import BACKBONES, OBJECTIVES, ConfigError
from onestep.sampling import guidance_cond, sample

DT = torch.float64
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

MU = torch.tensor([1.5, -2.0, 0.5], dtype=DT)
S = 0.6


# ----------------------------------------------------------------------------------------------
# Exact "networks" for x ~ N(μ, s²I) in the backbone contract (guidance conditions accepted, ignored).


class GaussianIMF(GaussianClosedForm):
    """u_θ = the exact average velocity (+ θ·g, θ = 0), and, with ``aux``, a v-head = the exact marginal
    velocity (+ θ_v·g). Unconditional, so the guided field is the plain one at every ω."""

    cond_keys = GUIDANCE_KEYS

    def __init__(self, aux: bool = True):
        super().__init__(MU, S)
        self.has_aux_head = aux
        self.theta = nn.Parameter(torch.zeros((), dtype=DT))
        self.theta_v = nn.Parameter(torch.zeros((), dtype=DT))

    def exact_u(self, z, t, h):
        r = t - h
        st, sr = self.sigma(t), self.sigma(r)
        ratio = ((t + r) - self.s**2 * (2 - t - r)) / (st * (st + sr))
        return -self.mu + (z - (1 - t)[:, None] * self.mu) * ratio[:, None]

    @staticmethod
    def g(z, t, h):
        return torch.tanh(z) * (1 + h)[:, None] + t[:, None]

    def forward(self, z, t, h=None, y=None, *, cond=None):
        h = torch.zeros_like(t) if h is None else h
        return self.exact_u(z, t, h) + self.theta * self.g(z, t, h)

    def forward_v(self, z, t, h=None, y=None, *, cond=None):
        return self.marginal_velocity(z, t) + self.theta_v * torch.cos(z)

    def forward_aux(self, z, t, h=None, y=None, *, cond=None, blocks=()):
        return self.forward(z, t, h), self.forward_v(z, t, h), []


def _times(n, seed, r_neq_t=True):
    g = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=DT)
    r = t * torch.rand(n, generator=g, dtype=DT) if r_neq_t else t.clone()
    r = torch.where(torch.arange(n) % 4 == 0, t, r)  # some r = t rows
    omega = sample_omega(n, generator=g).to(DT)
    t_min, t_max = sample_interval(t, r, generator=g)
    return t, r, omega, t_min, t_max


def _data(n, seed):
    g = torch.Generator().manual_seed(seed + 100)
    x = MU + S * torch.randn(n, 3, generator=g, dtype=DT)
    e = torch.randn(n, 3, generator=g, dtype=DT)
    return x, e


# ----------------------------------------------------------------------------------------------
# Priors.


def test_omega_prior_and_interval_sampling():
    g = torch.Generator().manual_seed(0)
    w = sample_omega(200_000, 1.0, 7.0, generator=g).double()
    assert w.min() >= 1 and w.max() <= 8 and w.dtype == DT
    # β = 1: log ω uniform on [0, log 8].
    assert float(w.log().mean()) == pytest.approx(math.log(8) / 2, abs=0.01)
    # β = 2: F(ω) = (1 − 1/ω)/(1 − 1/8).
    w2 = sample_omega(200_000, 2.0, 7.0, generator=g)
    assert float((w2 < 2).double().mean()) == pytest.approx(0.5 / 0.875, abs=0.005)
    assert torch.equal(sample_omega(5, 1.0, 0.0), torch.ones(5))
    t = torch.rand(1000, generator=g)
    r = torch.where(torch.arange(1000) % 2 == 0, t, 0.5 * t)
    t_min, t_max = sample_interval(t, r, generator=g)
    flow = t == r
    assert torch.equal(t_min[flow], torch.zeros(500)) and torch.equal(t_max[flow], torch.ones(500))
    assert 0 <= t_min[~flow].min() and t_min[~flow].max() <= 0.5 <= t_max[~flow].min() and t_max.max() <= 1
    off = sample_interval(t, r, enabled=False)
    assert torch.equal(off[0], torch.zeros(1000)) and torch.equal(off[1], torch.ones(1000))
    # omega_s_max = 0: ω ≡ 1.
    assert torch.equal(ImprovedMeanFlow(omega_s_max=0).sample_conditions(t, r)[0], torch.ones(1000))


def test_label_dropout_placement():
    torch.manual_seed(0)
    n = 4000
    t = torch.rand(n)
    r = torch.where(torch.arange(n) % 2 == 0, t, 0.3 * t)
    drop = ~ImprovedMeanFlow().keep_labels(n, t, r)
    assert 0.08 < float(drop.float().mean()) < 0.12
    assert drop[t == r].any() and drop[t != r].any()  # random: both halves
    drop = ~ImprovedMeanFlow(label_dropout="reference").keep_labels(n, t, r)
    assert 0.08 < float(drop.float().mean()) < 0.12 and not drop[t != r].any()  # reference: r = t rows only


# ----------------------------------------------------------------------------------------------
# Gaussian closed form.


@pytest.mark.parametrize("aux", [True, False])
def test_gaussian_exact_u_gives_v_equal_to_the_marginal_velocity(aux):
    """With the exact u and the exact marginal velocity as tangent (the v-head, or u at h = 0), the
    compound prediction V = u + (t − r)·du/dt is the marginal velocity E[e − x | z_t] pointwise, so
    the loss is only the target's own noise Σ(e − x − v(z_t, t))² (per term), and exactly 0 with
    the marginal velocity standing for e − x."""
    net = GaussianIMF(aux)
    n = 64
    t, r, omega, t_min, t_max = _times(n, 1)
    x, e = _data(n, 1)
    z = (1 - t)[:, None] * x + t[:, None] * e
    obj = ImprovedMeanFlow(adaptive_p=0.0)
    source = obj.tangent_source(net)
    assert source == ("aux_head" if aux else "boundary")
    v_marg = net.marginal_velocity(z, t)
    v_g, tangent, _ = obj.targets(net, z, t, r, e - x, None, None, omega, t_min, t_max, source, True)
    assert torch.equal(v_g, e - x)  # unconditional: nothing to guide with
    moving = t != r
    torch.testing.assert_close(tangent[moving], v_marg[moving], rtol=1e-12, atol=1e-12)
    cond = {"omega": omega, "t_min": t_min, "t_max": t_max}
    u, dudt, v, _ = obj.u_dudt(net, z, t, r, tangent, None, cond, aux)
    big_v = u + (t - r)[:, None] * dudt
    assert dudt[moving].abs().max() > 0.1  # the correction is not trivially zero
    torch.testing.assert_close(big_v, v_marg, rtol=1e-10, atol=1e-10)
    # The loss: the target noise only, one term per head.
    noise = ((e - x) - v_marg).pow(2).sum(1)
    out = obj.loss_given(net, x, None, e=e, t=t, r=r, omega=omega, t_min=t_min, t_max=t_max)
    torch.testing.assert_close(out.loss, noise * (2 if aux else 1), rtol=1e-9, atol=1e-12)
    # With the marginal velocity in place of e − x: loss 0, gradient 0.
    exact = obj.loss_given(net, x, None, e=e, t=t, r=r, omega=omega, t_min=t_min, t_max=t_max, v=v_marg)
    assert exact.loss.max() < 1e-18
    exact.loss.sum().backward()
    assert abs(float(net.theta.grad)) < 1e-8
    assert (net.theta_v.grad is None) != aux and (not aux or abs(float(net.theta_v.grad)) < 1e-8)


def test_gaussian_loss_gradient_vanishes_in_expectation():
    """At the exact solution the gradient of the plain (p = 0) loss through the full random path
    (t, r, ω, interval, noise) averages to zero: E[V − (e − x) | z_t] = 0."""
    torch.manual_seed(3)
    net = GaussianIMF(aux=True)
    n = 20_000
    x = MU + S * torch.randn(n, 3, dtype=DT)
    obj = ImprovedMeanFlow(adaptive_p=0.0)
    out = obj.loss(net, x, None, step=0)
    per_sample = [
        torch.autograd.grad(out.loss[i :: n // 8].sum(), (net.theta, net.theta_v), retain_graph=True) for i in range(8)
    ]  # 8 independent sub-batch means
    for k in range(2):
        means = torch.stack([g[k] for g in per_sample]) / (n // 8)
        spread = float(means.std()) / math.sqrt(8)
        assert abs(float(means.mean())) < 4 * spread + 1e-12, (k, means)
    # A wrong u (θ ≠ 0) has a clearly nonzero expected gradient.
    with torch.no_grad():
        net.theta.fill_(0.3)
    biased = torch.autograd.grad(obj.loss(net, x, None, step=0).loss.mean(), net.theta)[0]
    assert abs(float(biased)) > 10 * spread


# ----------------------------------------------------------------------------------------------
# The guided target on a two-class Gaussian mixture (exact conditional and unconditional velocities).

MUS = torch.tensor([[2.0, -1.0], [-1.5, 1.0]], dtype=DT)


class GaussianClass(GaussianClosedForm):
    pass


def _v_cond(z, t, k):
    return GaussianClass(MUS[k], S).marginal_velocity(z, t)


def _v_uncond(z, t):
    """Mixture (equal weights): Σ_k p(k | z_t) v_k(z_t, t), p(k | z) ∝ N(z; (1 − t)μ_k, σ(t)² I)."""
    sig = GaussianClass(MUS[0], S).sigma(t)
    logits = torch.stack([-((z - (1 - t)[:, None] * MUS[k]) ** 2).sum(1) / (2 * sig**2) for k in range(2)], 1)
    w = torch.softmax(logits, 1)
    return sum(w[:, k : k + 1] * _v_cond(z, t, torch.full_like(t, k, dtype=torch.long)) for k in range(2))


class GuidedField(nn.Module):
    """f(z, t, ω, y) = v_u + ω·(v_cond(y) − v_u), and v_u for the null label: the fixed point of a
    v-head (or boundary u) trained on the guided target."""

    num_classes = 2
    cond_keys = GUIDANCE_KEYS

    def __init__(self, aux: bool):
        super().__init__()
        self.has_aux_head = aux

    def field(self, z, t, y, cond):
        v_u = _v_uncond(z, t)
        kept = y != 2
        v_c = _v_cond(z, t, torch.where(kept, y, 0))
        return torch.where(kept[:, None], v_u + cond["omega"][:, None] * (v_c - v_u), v_u)

    def forward(self, z, t, h=None, y=None, *, cond=None):
        return self.field(z, t, y, cond)

    def forward_v(self, z, t, h=None, y=None, *, cond=None):
        return self.field(z, t, y, cond)


@pytest.mark.parametrize("aux", [True, False])
@pytest.mark.parametrize("uncond_omega", ["one", "same"])
def test_guided_target_equals_the_closed_form_cfg_velocity(aux, uncond_omega):
    n = 256
    t, r, omega, t_min, t_max = _times(n, 5)
    g = torch.Generator().manual_seed(6)
    y = torch.randint(0, 2, (n,), generator=g)
    z = 3 * torch.randn(n, 2, generator=g, dtype=DT)
    keep = torch.rand(n, generator=g) > 0.2
    v_cond, v_u = _v_cond(z, t, y), _v_uncond(z, t)
    obj = ImprovedMeanFlow(uncond_omega=uncond_omega)
    net = GuidedField(aux)
    source = obj.tangent_source(net)
    # E[e − x | z_t, y] = v_cond: the expected target is the CFG velocity with ω̃.
    v_g, tangent, guided = obj.targets(net, z, t, r, v_cond, y, keep, omega, t_min, t_max, source, True)
    inside = (t >= t_min) & (t <= t_max)
    omega_t = torch.where(inside, omega, torch.ones_like(omega))
    cfg = v_u + omega_t[:, None] * (v_cond - v_u)
    torch.testing.assert_close(v_g[keep], cfg[keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_g[~keep], v_cond[~keep])  # dropped rows: e − x as is
    assert inside[t == r].all() and (~inside).any()  # r = t rows always guided with the full ω
    assert torch.equal(guided, keep & (omega_t != 1))
    # Tangent: the guided field f(ω̃, y) on kept rows, the null-label field on dropped rows.
    moving = t != r
    torch.testing.assert_close(tangent[moving & keep], cfg[moving & keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent[moving & ~keep], v_u[moving & ~keep], rtol=1e-12, atol=1e-12)


def test_one_minus_inverse_omega_form_equals_meanflow_omega_minus_one_form():
    """If f(ω, y) is the guided field, v_t + (1 − 1/ω)(f(ω, y) − f(1, ∅)) equals MeanFlow's
    v_t + (ω − 1)(v_cond − v_u) (``cfg_velocity`` with ω = 1, κ = ω − 1) for any v_t."""
    g = torch.Generator().manual_seed(7)
    n = 50
    z, v_t = torch.randn(n, 2, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)
    t = torch.rand(n, generator=g, dtype=DT)
    y = torch.randint(0, 2, (n,), generator=g)
    omega = sample_omega(n, generator=g).to(DT)
    net = GuidedField(True)
    f = net.field(z, t, y, {"omega": omega})
    f_null = net.field(z, t, torch.full_like(y, 2), {"omega": torch.ones_like(omega)})
    v_cond, v_u = _v_cond(z, t, y), _v_uncond(z, t)
    imf = guided_target(v_t, f, f_null, omega)
    meanflow = torch.stack([cfg_velocity(v_t[i], v_cond[i], v_u[i], 1.0, float(omega[i]) - 1.0) for i in range(n)])
    torch.testing.assert_close(imf, meanflow, rtol=1e-12, atol=1e-12)
    # Both are, in expectation over v_t | z_t, y (= v_cond), the CFG velocity v_u + ω(v_cond − v_u).
    torch.testing.assert_close(guided_target(v_cond, f, f_null, omega), v_u + omega[:, None] * (v_cond - v_u))


# ----------------------------------------------------------------------------------------------
# JVP numerics against an independent transcription of the reference code (float64, explicit attention).


def _perturbed(name, **kw):
    torch.manual_seed(0)
    net = BACKBONES.build(name, **kw).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def reference_loss(net, x, y, e, t, r, omega, t_min, t_max, keep, *, aux, num_classes, p=1.0, c=0.01, uncond_one=True):
    """The iMF loss as the official imf.py computes it: v_fn (cond + null at ω = 1), v_cond_fn at the
    interval-masked ω, v_g_fm on r = t rows, label dropout, one jvp over the whole batch in (z, t, r)
    with tangents (v_c, 1, 0), V = u + (t − r)·sg(du/dt), adaptive weights per term."""
    col = lambda a: a.reshape(-1, *([1] * (x.ndim - 1)))  # noqa: E731
    z = col(1 - t) * x + col(t) * e
    v_t = e - x
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    null = torch.full_like(y, num_classes)

    def f(zz, tt, w, yy):
        cond = {"omega": w, "t_min": torch.zeros_like(tt), "t_max": torch.ones_like(tt)}
        if aux:
            return net.forward_aux(zz, tt, torch.zeros_like(tt), yy, cond=cond)[1]
        return net(zz, tt, torch.zeros_like(tt), yy, cond=cond)

    with torch.no_grad():
        out = f(
            torch.cat([z, z]),
            torch.cat([t, t]),
            torch.cat([omega, ones if uncond_one else omega]),
            torch.cat([y, null]),
        )
        v_c_full, v_u = out.chunk(2)
        v_g_fm = v_t + col(1 - 1 / omega) * (v_c_full - v_u)
        w = torch.where((t >= t_min) & (t <= t_max), omega, ones)
        v_c = f(z, t, w, y)
        v_g = v_t + col(1 - 1 / w) * (v_c - v_u)
        v_g = torch.where(col(t == r), v_g_fm, v_g)
        v_g = torch.where(col(keep), v_g, v_t)
    labels = torch.where(keep, y, null)
    cond = {"omega": omega, "t_min": t_min, "t_max": t_max}

    def fn(z_, t_, r_):
        if aux:
            u, v, _ = net.forward_aux(z_, t_, t_ - r_, labels, cond=cond)
            return u, v
        return net(z_, t_, t_ - r_, labels, cond=cond), torch.zeros_like(z_)

    with jvp_attention("explicit"):
        u, dudt, v = torch.func.jvp(fn, (z, t, r), (v_c, ones, zeros), has_aux=True)
    big_v = u + col(t - r) * dudt.detach()
    l_u = (big_v - v_g).pow(2).flatten(1).sum(1)
    loss = l_u / (l_u.detach() + c) ** p
    if aux:
        l_v = (v - v_g).pow(2).flatten(1).sum(1)
        loss = loss + l_v / (l_v.detach() + c) ** p
    return loss


def _batch(net, n=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *net.input_shape, generator=g, dtype=DT)
    e = torch.randn(n, *net.input_shape, generator=g, dtype=DT)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=DT)
    r = torch.where(torch.arange(n) % 2 == 0, t, t * torch.rand(n, generator=g, dtype=DT))
    omega = sample_omega(n, generator=g).to(DT)
    t_min, t_max = sample_interval(t, r, generator=g)
    t_min[1], t_max[1] = 0.0, 0.01  # one r != t row outside its interval
    y = torch.randint(0, net.num_classes, (n,), generator=g)
    keep = torch.ones(n, dtype=torch.bool)
    keep[[0, 4]] = False  # dropped rows are r = t rows, as in the reference code
    return x, y, e, t, r, omega, t_min, t_max, keep


@pytest.mark.parametrize(
    "name, kw, tangent",
    [
        ("test_imf_dit", {}, "aux_head"),
        ("test_dit", {"guidance_conditions": True}, "boundary"),
        ("test_imf_dit", {"aux_head": False}, "boundary"),
    ],
)
@pytest.mark.parametrize("kernel, subset, uncond", [("fused", True, "one"), ("explicit", False, "same")])
def test_loss_and_gradients_match_the_reference_transcription(name, kw, tangent, kernel, subset, uncond):
    net = _perturbed(name, input_shape=(4, 8, 8), num_classes=5, **kw)
    x, y, e, t, r, omega, t_min, t_max, keep = _batch(net)
    obj = ImprovedMeanFlow(jvp_kernel=kernel, jvp_only_r_neq_t=subset, uncond_omega=uncond)
    assert obj.tangent_source(net) == tangent
    out = obj.loss_given(net, x, y, e=e, t=t, r=r, omega=omega, t_min=t_min, t_max=t_max, keep=keep)
    grads = torch.autograd.grad(out.loss.sum(), list(net.parameters()), allow_unused=True)
    want = reference_loss(
        net,
        x,
        y,
        e,
        t,
        r,
        omega,
        t_min,
        t_max,
        keep,
        aux=tangent == "aux_head",
        num_classes=5,
        uncond_one=uncond == "one",
    )
    want_grads = torch.autograd.grad(want.sum(), list(net.parameters()), allow_unused=True)
    assert out.loss.min() > 0
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, want_grads):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().max()) == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert ("mse_v" in out.logs) == (tangent == "aux_head")


@pytest.mark.parametrize("aux", [True, False])
def test_imf_jvp_matches_torch_func_jvp_with_plain_attention(aux):
    """imf_jvp (fused attention rule) == torch.func.jvp through explicit softmax attention, in (z, t, h)
    along (tangent, 1, 1); the v-head output from the same pass equals forward_aux's."""
    net = _perturbed("test_imf_dit", input_shape=(4, 8, 8), num_classes=5)
    x, y, e, t, r, omega, t_min, t_max, _ = _batch(net, seed=4)
    tangent = torch.randn_like(x)
    cond = {"omega": omega, "t_min": t_min, "t_max": t_max}
    u, dudt, v, feats = imf_jvp(net, x, t, t - r, tangent, y, cond, aux=aux, feature_blocks=(0,))
    with jvp_attention("explicit"):
        u_ref, dudt_ref = torch.func.jvp(
            lambda z_, t_, h_: net(z_, t_, h_, y, cond=cond),
            (x, t, t - r),
            (tangent, torch.ones_like(t), torch.ones_like(t)),
        )
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dudt, dudt_ref, rtol=1e-10, atol=1e-12)
    assert dudt.abs().max() > 1e-3
    if aux:
        torch.testing.assert_close(v, net.forward_aux(x, t, t - r, y, cond=cond)[1], rtol=1e-12, atol=1e-12)
        assert v.requires_grad
        torch.testing.assert_close(net.forward_v(x, t, t - r, y, cond=cond), v, rtol=1e-12, atol=1e-12)
    else:
        assert v is None
    assert len(feats) == 1 and feats[0].requires_grad


def test_dropped_rows_with_r_neq_t_take_the_null_label_tangent():
    net = _perturbed("test_dit", input_shape=(4, 8, 8), num_classes=5, guidance_conditions=True)
    x, y, e, t, r, omega, t_min, t_max, keep = _batch(net)
    keep[1] = False  # an r != t row
    obj = ImprovedMeanFlow()
    z = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * e
    _, tangent, _ = obj.targets(net, z, t, r, e - x, y, keep, omega, t_min, t_max, "boundary", True)
    zero = torch.zeros(1, dtype=DT)
    null = net(z[1:2], t[1:2], zero, torch.tensor([5]), cond={"omega": 1.0, "t_min": 0.0, "t_max": 1.0})
    torch.testing.assert_close(tangent[1:2], null)


# ----------------------------------------------------------------------------------------------
# Sampling with guidance inputs.


def test_sampler_steps_and_guidance_inputs():
    net = _perturbed("test_dit", input_shape=(4, 8, 8), num_classes=5, guidance_conditions=True)
    obj = ImprovedMeanFlow()
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(4, 4, 8, 8, generator=g, dtype=DT)
    y = torch.tensor([0, 1, 2, 3])
    one = torch.ones(4, dtype=DT)
    plain = sample(obj, net, noise, y, nfe=1)
    torch.testing.assert_close(plain, noise - net(noise, one, one, y))  # x = e − u(e, h = 1)
    # ω = 1 on [0, 1] is the unguided model.
    torch.testing.assert_close(sample(obj, net, noise, y, nfe=1, cond=guidance_cond(1.0)), plain, rtol=0, atol=0)
    # Guidance inputs change the samples, one network call per step.
    w4 = sample(obj, net, noise, y, nfe=1, cond=guidance_cond(4.0))
    windowed = sample(obj, net, noise, y, nfe=1, cond=guidance_cond(4.0, (0.4, 0.65)))
    assert (w4 - plain).abs().max() > 1e-4 and (windowed - w4).abs().max() > 1e-4
    c = {"omega": 4.0, "t_min": 0.4, "t_max": 0.65}
    torch.testing.assert_close(windowed, noise - net(noise, one, one, y, cond=c))
    # 2 NFE: 1 → 0.5 → 0, h = 0.5 at both steps.
    assert torch.equal(obj.time_grid(2), torch.tensor([1.0, 0.5, 0.0]))
    half = 0.5 * one
    mid = noise - 0.5 * net(noise, one, half, y, cond=c)
    torch.testing.assert_close(sample(obj, net, noise, y, nfe=2, cond=c), mid - 0.5 * net(mid, half, half, y, cond=c))


def test_guidance_needs_a_guidance_conditioned_model():
    noise = torch.randn(2, 2)
    plain = BACKBONES.build("test_mlp")
    with pytest.raises(ValueError, match="built without guidance conditions"):
        sample(ImprovedMeanFlow(omega_s_max=0), plain, noise, cond=guidance_cond(2.0))
    guided = BACKBONES.build("test_mlp", guidance_conditions=True)
    with pytest.raises(ValueError, match="does not sample with guidance conditions"):
        sample(OBJECTIVES.build("meanflow"), guided, noise, cond=guidance_cond(2.0))
    with pytest.raises(ValueError, match=">= 1"):
        guidance_cond(0.5)
    with pytest.raises(ValueError, match="t_min <= t_max"):
        guidance_cond(2.0, (0.7, 0.3))


# ----------------------------------------------------------------------------------------------
# Options and backbones.


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"tangent": "vhead"}, "tangent. must be one of 'auto', 'aux_head', 'boundary'"),
        ({"omega_s_max": -1.0}, r"omega_s_max must be in \[0, inf\)"),
        ({"omega_beta": -0.5}, "omega_beta must be in"),
        ({"uncond_omega": "half"}, "uncond_omega. must be one of"),
        ({"label_dropout": "first"}, "label_dropout. must be one of"),
        ({"class_dropout": 1.0}, r"class_dropout must be in \[0, 1\)"),
        ({"ratio_r_neq_t": 1.5}, "ratio_r_neq_t"),
        ({"jvp_kernel": "flash"}, "jvp_kernel. must be one of"),
    ],
)
def test_options_are_one_line_errors(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        OBJECTIVES.build("improved_meanflow", **kwargs)
    assert "\n" not in str(info.value)


def test_backbone_checks():
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="tangent='aux_head' needs a backbone with an auxiliary v-head"):
        ImprovedMeanFlow(tangent="aux_head").loss(
            BACKBONES.build("test_mlp", guidance_conditions=True), x, None, step=0
        )
    with pytest.raises(ValueError, match="built without guidance conditions"):
        ImprovedMeanFlow().loss(BACKBONES.build("test_mlp", num_classes=3), x, y, step=0)
    # Without guidance (ω ≡ 1) any backbone trains; no cond is passed.
    out = ImprovedMeanFlow(omega_s_max=0).loss(BACKBONES.build("test_mlp", num_classes=3), x, y, step=0)
    assert out.loss.shape == (4,) and torch.isfinite(out.loss).all()
    assert ImprovedMeanFlow().tangent_source(BACKBONES.build("test_imf_dit")) == "aux_head"
    assert ImprovedMeanFlow().tangent_source(BACKBONES.build("test_imf_dit", aux_head=False)) == "boundary"


def test_losses_features_and_bf16_on_registered_backbones():
    torch.manual_seed(0)
    for name, kw, shape in [("test_imf_dit", {}, (4, 8, 8)), ("test_unet", {"guidance_conditions": True}, (3, 8, 8))]:
        net = BACKBONES.build(name, input_shape=shape, num_classes=10, **kw)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        x, y = torch.randn(6, *shape), torch.randint(0, 10, (6,))
        obj = ImprovedMeanFlow()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = obj.loss(net, x, y, step=0, feature_blocks=(0, -1))
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss).all()
        (out.loss.mean() + sum(f.float().pow(2).mean() for f in out.features)).backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, (name, missing)


# ----------------------------------------------------------------------------------------------
# End to end: train, sample and eval with guidance, a sweep, compare and plot.

RECIPE = """
seed: 1
data: {name: eight_gaussians}
backbone: {name: test_mlp, guidance_conditions: true}
objective: {name: improved_meanflow}
train: {steps: 3, batch_size: 16, lr: 0.01, log_every: 1, num_preview: 10, checkpoint_every: 0}
eval: {num_samples: 100, batch_size: 50, nfe: [1], metrics: [sliced_wasserstein], guidance: 2.0}
"""


def test_cli_guidance_sample_eval_sweep_compare_plot(tmp_path, capsys):
    recipe = tmp_path / "imf.yaml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress"]) == 0
    assert (
        main(
            [
                "sample",
                str(run),
                "-n",
                "6",
                "--guidance",
                "3",
                "--guidance-interval",
                "0.2,0.8",
                "--out",
                str(tmp_path / "s.npz"),
            ]
        )
        == 0
    )
    assert "guidance 3 on [0.2, 0.8]" in capsys.readouterr().out
    assert main(["eval", str(run), "--guidance", "1,2,4"]) == 0
    assert main(["eval", str(run), "--nfe", "2"]) == 0  # the recipe's eval.guidance: 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["guidance"], r["guidance_interval"], r["nfe"]) for r in rows] == [
        (1.0, [0.0, 1.0], 1),
        (2.0, [0.0, 1.0], 1),
        (4.0, [0.0, 1.0], 1),
        (2.0, [0.0, 1.0], 2),
    ]
    best = min(rows[:3], key=lambda r: r["value"])
    assert len({r["value"] for r in rows[:3]}) == 3  # ω is an input: each value differs
    capsys.readouterr()
    assert main(["compare", str(run), "--format", "md"]) == 0
    table = capsys.readouterr().out
    assert f"(ω={best['guidance']:g})" in table and "best value over the guidance scales" in table
    pytest.importorskip("matplotlib")
    assert main(["plot", str(run)]) == 0
    assert (run / "plots" / "guidance.png").stat().st_size > 1000
    # A model without guidance conditions: a clear error.
    plain = tmp_path / "plain"
    plain_recipe = tmp_path / "plain.yaml"
    plain_recipe.write_text(
        RECIPE.replace("guidance_conditions: true", "guidance_conditions: false")
        .replace("{name: improved_meanflow}", "{name: meanflow}")
        .replace(", guidance: 2.0", "")
    )
    assert main(["train", str(plain_recipe), "--run-dir", str(plain), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(plain), "--guidance", "2"]) == 2
    assert "has no sampling-time guidance" in capsys.readouterr().err
    assert main(["eval", str(run), "--guidance", "two"]) == 2
    assert "--guidance takes comma-separated numbers" in capsys.readouterr().err
    # eval.guidance on a model without guidance conditions is refused before training starts.
    assert main(["validate", str(plain_recipe), "eval.guidance=2.0"]) == 2
    assert "eval.guidance: objective MeanFlow has no sampling-time guidance" in capsys.readouterr().err
    assert main(["train", str(plain_recipe), "eval.guidance=2.0", "--run-dir", str(tmp_path / "no")]) == 2
    assert "eval.guidance: objective MeanFlow has no sampling-time guidance" in capsys.readouterr().err
    assert main(["sample", str(plain), "--guidance", "2", "--out", str(tmp_path / "p.npz")]) == 2


def test_dry_run_prints_inference_and_training_parameters(capsys):
    assert main(["train", "imf_b2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# backbone imf_dit_b_2: 145,596,960 parameters" in out
    assert "# inference model (without the training-only v-head): 88,935,184 parameters (88.9M)" in out


def test_imf_recipes_use_the_published_latent_statistics():
    from onestep.config import load_config
    from onestep.data.latents import IMF_LATENT_MEAN, IMF_LATENT_STD

    for size in ("b2", "m2", "l2", "xl2"):
        cfg = load_config(f"imf_{size}")
        assert cfg.data["latent_mean"] == IMF_LATENT_MEAN and cfg.data["latent_std"] == IMF_LATENT_STD
        assert "scale" not in cfg.data and cfg.objective["name"] == "improved_meanflow"
        assert cfg.train.optimizer == "adamw" and cfg.train.betas == (0.9, 0.95) and cfg.train.batch_size == 1024


# ----------------------------------------------------------------------------------------------
# The shared target pass: v_c of the kept r = t rows read off the training forward.


@pytest.mark.parametrize(
    "name, kw",
    [("test_imf_dit", {}), ("test_dit", {"guidance_conditions": True}), ("test_imf_dit", {"aux_head": False})],
)
@pytest.mark.parametrize("uncond, blocks", [("one", ()), ("same", (0, -1)), ("one", (1,))])
@pytest.mark.parametrize("interval", [True, False])
def test_shared_target_pass_equals_the_separate_pass_in_float64(name, kw, uncond, blocks, interval):
    net = _perturbed(name, input_shape=(4, 8, 8), num_classes=5, **kw)
    x, y, e, t, r, omega, t_min, t_max, keep = _batch(net)
    if not interval:
        t_min, t_max = torch.zeros_like(t), torch.ones_like(t)
    outs = []
    for target_pass in ("shared", "separate"):
        obj = ImprovedMeanFlow(uncond_omega=uncond, target_pass=target_pass, guidance_interval=interval)
        out = obj.loss_given(
            net, x, y, e=e, t=t, r=r, omega=omega, t_min=t_min, t_max=t_max, keep=keep, feature_blocks=blocks
        )
        total = out.loss.sum() + sum(f.pow(2).mean() for f in out.features)
        grads = torch.autograd.grad(total, list(net.parameters()), allow_unused=True)
        outs.append((out, grads))
    (a, ga), (b, gb) = outs
    assert a.loss.min() > 0 and len(a.features) == len(blocks)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-9)
    for fa, fb in zip(a.features, b.features):
        torch.testing.assert_close(fa, fb, rtol=1e-6, atol=1e-9)
    for p, q in zip(ga, gb):
        assert (p is None) == (q is None)
        if p is not None:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)


def test_shared_target_pass_sends_fewer_rows_through_the_net_and_falls_back_where_it_must():
    net = _perturbed("test_imf_dit", input_shape=(4, 8, 8), num_classes=5)
    x, y, e, t, r, omega, t_min, t_max, keep = _batch(net)
    kept_r_eq_t = int(((t == r) & keep).sum())
    assert kept_r_eq_t > 0

    def rows(**options):
        obj = ImprovedMeanFlow(**options)
        seen = []
        original = obj.velocity

        def spy(net_, z, *args):
            seen.append(z.shape[0])
            return original(net_, z, *args)

        obj.velocity = spy
        obj.loss_given(net, x, y, e=e, t=t, r=r, omega=omega, t_min=t_min, t_max=t_max, keep=keep)
        return sum(seen)

    separate = rows(target_pass="separate")
    assert rows() == separate - kept_r_eq_t  # shared is the default
    # With the JVP over the whole batch there is no plain forward on the r = t rows to read.
    assert rows(jvp_only_r_neq_t=False) == separate
    with pytest.raises(ValueError, match="target_pass"):
        ImprovedMeanFlow(target_pass="joint")
