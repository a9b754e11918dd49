"""The batch-posterior (stable target field) velocity estimate and its use in flow matching and MeanFlow."""

import math

import pytest
import torch

from onestep.objectives.common import batch_posterior_velocity
from onestep.objectives.flow_matching import FlowMatching
from onestep.objectives.meanflow import MeanFlow
from onestep.registry import BACKBONES


def brute_force(x, e, t, labels=None, query=None, null=None):
    """E[v | z_i] over the reference set by explicit Gaussian log-densities, one sample at a time."""
    x, e, t = x.double().flatten(1), e.double().flatten(1), t.double()
    out = []
    for i in range(x.shape[0]):
        z = (1 - t[i]) * x[i] + t[i] * e[i]
        if t[i] == 0:
            out.append(e[i] - x[i])
            continue
        allowed = [
            j for j in range(x.shape[0]) if labels is None or query[i] == null or labels[j] == query[i] or j == i
        ]
        logp = torch.stack([-((z - (1 - t[i]) * x[j]) ** 2).sum() / (2 * t[i] ** 2) for j in allowed])
        w = torch.softmax(logp, 0)
        velocities = torch.stack([(z - x[j]) / t[i] for j in allowed])
        out.append((w[:, None] * velocities).sum(0))
    return torch.stack(out)


def test_matches_the_explicit_posterior_mean_with_and_without_classes():
    g = torch.Generator().manual_seed(0)
    x, e = 1.5 * torch.randn(24, 3, generator=g), torch.randn(24, 3, generator=g)
    t = torch.rand(24, generator=g)
    t[0], t[1], t[2], t[5] = 0.0, 1.0, 1e-3, 0.8
    got = batch_posterior_velocity(x, e, t)
    torch.testing.assert_close(got.double(), brute_force(x, e, t), atol=1e-5, rtol=1e-5)
    # Exact at the ends: e − x at t = 0, e − mean(x) at t = 1.
    torch.testing.assert_close(got[0], e[0] - x[0])
    torch.testing.assert_close(got[1], e[1] - x.mean(0), atol=1e-5, rtol=1e-5)
    # Per class: labelled queries see their class (and themselves), null queries (id 3) see everything.
    labels = torch.randint(0, 3, (24,), generator=g)
    query = labels.clone()
    query[::4] = 3
    got = batch_posterior_velocity(x, e, t, labels, query, null_class=3)
    torch.testing.assert_close(got.double(), brute_force(x, e, t, labels, query, 3), atol=1e-5, rtol=1e-5)
    assert int(query[5]) == int(labels[5])
    assert not torch.allclose(got[5], batch_posterior_velocity(x, e, t)[5], atol=1e-3)


def test_converges_to_the_gaussian_marginal_velocity_with_far_less_variance():
    # x ~ N(mu, s² I): E[x | z_t] = mu + (1 − t) s² / ((1 − t)² s² + t²) · (z − (1 − t) mu).
    g = torch.Generator().manual_seed(1)
    n, mu, s = 4000, torch.tensor([1.0, -2.0]), 0.7
    x = mu + s * torch.randn(n, 2, generator=g)
    e = torch.randn(n, 2, generator=g)
    for t_value in (0.2, 0.5, 0.9):
        t = torch.full((n,), t_value)
        z = (1 - t_value) * x + t_value * e
        gain = (1 - t_value) * s**2 / ((1 - t_value) ** 2 * s**2 + t_value**2)
        exact = (z - (mu + gain * (z - (1 - t_value) * mu))) / t_value
        est = batch_posterior_velocity(x, e, t)
        err_est = (est - exact).square().sum(1).mean()
        err_conditional = (e - x - exact).square().sum(1).mean()
        # Conditional variance of e − x given z_t: 2 · s² / ((1 − t)² s² + t²).
        expected = 2 * s**2 / ((1 - t_value) ** 2 * s**2 + t_value**2)
        assert math.isclose(float(err_conditional), expected, rel_tol=0.05)
        assert float(err_est) < 0.01 * expected, (t_value, float(err_est), expected)


def test_one_sample_batch_is_the_conditional_velocity_and_wiring():
    torch.manual_seed(0)
    net = BACKBONES.build("mlp_toy", input_shape=(2,), width=32, depth=2)
    x = torch.randn(1, 2)
    for cls in (MeanFlow, FlowMatching):
        torch.manual_seed(3)
        plain = cls(adaptive_p=0.0).loss(net, x, None, step=0).loss
        torch.manual_seed(3)
        bp = cls(adaptive_p=0.0, velocity_estimate="batch_posterior").loss(net, x, None, step=0).loss
        torch.testing.assert_close(bp, plain)
    # A real batch: the estimate is used (different loss, same random draws).
    xb = 2 * torch.randn(64, 2)
    for cls, kw in ((MeanFlow, {"ratio_r_neq_t": 0.5}), (FlowMatching, {})):
        torch.manual_seed(3)
        plain = cls(adaptive_p=0.0, **kw).loss(net, xb, None, step=0).loss
        torch.manual_seed(3)
        bp = cls(adaptive_p=0.0, velocity_estimate="batch_posterior", **kw).loss(net, xb, None, step=0).loss
        assert not torch.allclose(bp, plain)


def test_flow_matching_regresses_the_given_estimate():
    net = BACKBONES.build("mlp_toy", input_shape=(2,), width=32, depth=2)
    g = torch.Generator().manual_seed(2)
    x, e, t = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g), torch.rand(16, generator=g)
    v = batch_posterior_velocity(x, e, t)
    z = (1 - t[:, None]) * x + t[:, None] * e
    with torch.no_grad():
        want = (net(z, t, torch.zeros_like(t), None) - v).square().sum(1)
        got = FlowMatching().loss_given(net, x, None, e=e, t=t, v=v).loss
    torch.testing.assert_close(got, want)


def test_bad_settings_fail_with_one_line():
    with pytest.raises(ValueError, match="velocity_estimate must be one of 'conditional', 'batch_posterior'"):
        MeanFlow(velocity_estimate="stf")
    with pytest.raises(ValueError, match="velocity_estimate must be one of"):
        FlowMatching(velocity_estimate="posterior")
    teacher = BACKBONES.build("mlp_toy", input_shape=(2,), width=32, depth=2)
    with pytest.raises(ValueError, match="cannot be combined with a teacher"):
        MeanFlow(velocity_estimate="batch_posterior", teacher=teacher)


def test_a_slice_against_the_whole_reference_equals_the_whole_batch():
    # What a DDP rank computes (its rows, the gathered batch as reference) = the one-process result.
    g = torch.Generator().manual_seed(4)
    x, e, t = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g), torch.rand(12, generator=g)
    labels = torch.randint(0, 2, (12,), generator=g)
    query = labels.clone()
    query[::3] = 2
    whole = batch_posterior_velocity(x, e, t, labels, query, 2)
    part = batch_posterior_velocity(x[4:8], e[4:8], t[4:8], labels, query[4:8], 2, reference=x, offset=4)
    torch.testing.assert_close(part, whole[4:8])
    with pytest.raises(ValueError, match="must hold x"):
        batch_posterior_velocity(x[4:8], e[4:8], t[4:8], reference=x, offset=10)
