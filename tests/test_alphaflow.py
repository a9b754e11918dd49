"""α-Flow as a MeanFlow option: the curriculum, α = 0 is MeanFlow's loss exactly, α = 1 trajectory flow
matching, and the discrete target and loss against an independent transcription of the authors'
AlphaFlowLoss (snap-research/alphaflow loss.py, as specified in docs/alphaflow.md) in float64."""

from __future__ import annotations

import pytest
import torch

from onestep.backbones.dit import DiT
from onestep.objectives.meanflow import MeanFlow, alpha_schedule

SHAPE, CLASSES = (2, 4, 4), 3


def _net(seed=0):
    torch.manual_seed(seed)
    net = DiT(SHAPE, CLASSES, patch_size=2, depth=2, hidden_size=16, num_heads=2)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return net.double().eval()


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    e = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    r[:2] = t[:2]  # the first samples are flow matching (r = t), as the authors' batches
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return x, e, t, r, y


def test_the_curriculum_matches_the_published_schedule():
    # B/2 (0 -> 400K, gamma 25, clamp 0.005): alpha is 1 until ~115.3K and 0 after ~284.7K.
    a = [alpha_schedule(k, 1.0, 0.0, 0, 400_000) for k in (0, 115_000, 116_000, 200_000, 284_000, 285_000, 500_000)]
    assert a[0] == a[1] == 1.0 and 0.99 < a[2] < 1.0 and a[3] == pytest.approx(0.5)
    assert 0 < a[4] < 0.01 and a[5] == a[6] == 0.0
    # XL/2 (600K -> 1M): 1 before the start, 0.5 at 800K.
    assert alpha_schedule(599_999, 1.0, 0.0, 600_000, 1_000_000) == 1.0
    assert alpha_schedule(800_000, 1.0, 0.0, 600_000, 1_000_000) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="alpha_steps"):
        MeanFlow(alpha_start=1.0, alpha_steps=[10, 5])
    assert MeanFlow().alpha_at(7) is None and MeanFlow(alpha_start=1.0, alpha_steps=[0, 10]).alpha_at(10) == 0.0


def test_alpha_zero_is_meanflow_exactly_and_alpha_one_is_trajectory_flow_matching():
    net = _net()
    x, e, t, r, y = _batch()
    mf = MeanFlow(jvp_kernel="explicit", cfg_omega=1.0, cfg_kappa=0.5, class_dropout=0.0)
    af = MeanFlow(
        jvp_kernel="explicit", cfg_omega=1.0, cfg_kappa=0.5, class_dropout=0.0, alpha_start=1.0, alpha_steps=[0, 100]
    )
    plain = mf.loss_given(net, x, y, e=e, t=t, r=r).loss
    assert torch.equal(af.loss_given(net, x, y, e=e, t=t, r=r, alpha=0.0).loss, plain)
    # alpha = 1: u_tgt = ṽ for every sample, each weighed 1 (alpha), the MeanFlow adaptive weight.
    one = af.loss_given(net, x, y, e=e, t=t, r=r, alpha=1.0).loss
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    v_tilde, _ = mf.guided_velocity(net, z, t, e - x, y)
    l = ((net(z, t, t - r, y) - v_tilde) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(one, l / (l.detach() + 0.01), rtol=1e-12, atol=1e-12)


def authors_alphaflow_loss(model, x, y, e, t, r, alpha, omega, kappa, null, clamp=4.0, eps=1e-3):
    """An independent transcription of AlphaFlowLoss.forward for given (t, r, α) and noise, labels kept:
    ṽ = ω·v + κ·u(z, t, t) + (1 − ω − κ)·u(z, t, t | ∅); FM samples (Δ = 0) target ṽ; the others
    target clip((Δ·ṽ + (t − Δ − r)·u(z_t − Δ·ṽ, t − Δ, r)) / (t − r)) with Δ = α·(t − r);
    L = w·ℓ / sg(ℓ + ε), ℓ the per-element mean, w = 1 (FM) or α (discrete). The authors' net takes
    (x, sigma_next = r, sigma = t)."""

    def col(a):
        return a.view(-1, 1, 1, 1)

    z = (1 - col(t)) * x + col(t) * e
    v = e - x
    with torch.no_grad():
        v_tilde = omega * v + kappa * model(z, t, t, y) + (1 - omega - kappa) * model(z, t, t, torch.full_like(y, null))
        delta = alpha * (t - r)
        fm = delta == 0
        rest = model(z - col(delta) * v_tilde, t - delta, r, y)
        discrete = (col(delta) * v_tilde + col(t - delta - r) * rest) / col(torch.where(fm, torch.ones_like(t), t - r))
        target = torch.where(col(fm), v_tilde, discrete.clamp(-clamp, clamp))
    u = model(z, t, r, y)
    ell = ((u - target) ** 2).mean(dim=(1, 2, 3))
    w = torch.where(fm, torch.ones_like(t), torch.full_like(t, alpha))
    return w * ell / (ell.detach() + eps)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0])
def test_discrete_target_and_loss_equal_the_authors(alpha):
    net = _net()
    x, e, t, r, y = _batch()
    af = MeanFlow(
        cfg_omega=1.0,
        cfg_kappa=0.5,
        class_dropout=0.0,
        alpha_start=1.0,
        alpha_steps=[0, 100],
        u_target_clamp=0.5,  # small enough to clip some discrete targets (the authors use 4)
        loss_reduction="mean",
        adaptive_c=1e-3,
    )
    ours = af.loss_given(net, x, y, e=e, t=t, r=r, alpha=alpha).loss

    def model(z, tt, rr, yy):
        return net(z, tt, tt - rr, yy)

    theirs = authors_alphaflow_loss(model, x, y, e, t, r, alpha, omega=1.0, kappa=0.5, null=CLASSES, clamp=0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours.mean(), list(net.parameters()))
    g_theirs = torch.autograd.grad(theirs.mean(), list(net.parameters()))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
