"""The linear / convolution forward-mode rules (onestep.backbones.jvp_layers) equal torch's own rules:
primal, tangent (with and without weight tangents), gradients through the primal and through the
tangent, in float64, and gradients under bf16 autocast; and the JVP objectives actually use them."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from onestep.backbones import jvp_layers
from onestep.backbones.attention import jvp_attention
from onestep.backbones.jvp_layers import jvp_layer_rules


@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _close(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _both(fn, primals, tangents, *, tangent_grad=True):
    """(primal, tangent) from torch's rules and from ours."""
    ref = torch.func.jvp(fn, primals, tangents)
    with jvp_layer_rules(tangent_grad):
        ours = torch.func.jvp(fn, primals, tangents)
    return ref, ours


CONV_CASES = [
    dict(),
    dict(stride=2, padding=1),
    dict(padding=2, dilation=2, groups=2),
    dict(padding="same"),
    dict(padding="valid", stride=(2, 1)),
]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_tangent_equals_torch(bias):
    torch.manual_seed(0)
    x, dx = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    w, b = torch.randn(4, 7), torch.randn(4) if bias else None
    (p0, t0), (p1, t1) = _both(lambda x_: F.linear(x_, w, b), (x,), (dx,))
    _close(p1, p0)
    _close(t1, t0)
    _close(t1, dx @ w.t())
    # Tangents on the weight and bias too (a JVP with respect to parameters).
    dw = torch.randn_like(w)
    if bias:
        db = torch.randn(4)
        (p0, t0), (p1, t1) = _both(lambda x_, w_, b_: F.linear(x_, w_, b_), (x, w, b), (dx, dw, db))
    else:
        (p0, t0), (p1, t1) = _both(lambda x_, w_: F.linear(x_, w_), (x, w), (dx, dw))
    _close(p1, p0)
    _close(t1, t0)


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_conv2d_tangent_equals_torch(case):
    torch.manual_seed(1)
    groups = case.get("groups", 1)
    x, dx = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    w, b, dw, db = torch.randn(6, 4 // groups, 3, 3), torch.randn(6), torch.randn(6, 4 // groups, 3, 3), torch.randn(6)
    (p0, t0), (p1, t1) = _both(lambda x_: F.conv2d(x_, w, b, **case), (x,), (dx,))
    _close(p1, p0)
    _close(t1, t0)
    (p0, t0), (p1, t1) = _both(lambda x_, w_, b_: F.conv2d(x_, w_, b_, **case), (x, w, b), (dx, dw, db))
    _close(t1, t0)


def _grads_through_jvp(module, x, dx, rules: bool, tangent_grad: bool):
    """Gradients of a loss on the primal and (optionally) on the tangent of a JVP through module."""
    module.zero_grad()
    xr = x.clone().requires_grad_(True)
    ctx = jvp_layer_rules(tangent_grad) if rules else torch.enable_grad()
    with ctx:
        out, tangent = torch.func.jvp(module, (xr,), (dx,))
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    if tangent_grad:
        loss = loss + (tangent**2).sum()
    loss.backward()
    return [xr.grad] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("tangent_grad", [False, True])
def test_gradients_through_primal_and_tangent_equal_torch(kind, tangent_grad):
    torch.manual_seed(2)
    if kind == "linear":
        module = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        x, dx = torch.randn(5, 7), torch.randn(5, 7)
    else:
        module = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 2, 3, stride=2)
        )
        x, dx = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    ref = _grads_through_jvp(module, x, dx, rules=False, tangent_grad=tangent_grad)
    ours = _grads_through_jvp(module, x, dx, rules=True, tangent_grad=tangent_grad)
    for a, b in zip(ours, ref):
        _close(a, b)


def test_tangent_without_graph_when_asked():
    lin = torch.nn.Linear(4, 3)
    x, dx = torch.randn(2, 4), torch.randn(2, 4)
    with jvp_layer_rules(tangent_grad=False):
        out, tangent = torch.func.jvp(lin, (x,), (dx,))
    assert out.requires_grad and not tangent.requires_grad


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bf16_autocast_gradients_match_torch(kind):
    torch.manual_seed(3)
    if kind == "linear":
        module = torch.nn.Linear(16, 8).float()
        x = torch.randn(4, 16, dtype=torch.float32)
    else:
        module = torch.nn.Conv2d(3, 4, 3, padding=1).float()
        x = torch.randn(2, 3, 6, 6, dtype=torch.float32)
    results = []
    for rules in (False, True):
        module.zero_grad()
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with jvp_layer_rules(False) if rules else torch.enable_grad():
                out, tangent = torch.func.jvp(module, (xr,), (torch.ones_like(x),))
            out.float().square().sum().backward()
        results.append((out, tangent, xr.grad, [p.grad for p in module.parameters()]))
    (o0, t0, g0, p0), (o1, t1, g1, p1) = results
    assert o1.dtype == o0.dtype == torch.bfloat16 and t1.dtype == t0.dtype
    torch.testing.assert_close(o1, o0)
    torch.testing.assert_close(t1, t0)
    assert g1.dtype == g0.dtype == torch.float32
    torch.testing.assert_close(g1, g0, rtol=1e-2, atol=1e-2)
    for a, b in zip(p1, p0):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_fused_jvp_kernel_routes_layers_through_the_rules():
    from onestep.registry import BACKBONES

    net = BACKBONES.build(
        "dit", input_shape=(4, 8, 8), num_classes=3, depth=1, hidden_size=32, num_heads=2, patch_size=2
    ).double()
    for p in net.parameters():  # DiT zero-initialises its output layer: make every path count
        torch.nn.init.normal_(p, std=0.2)
    z, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, h = torch.rand(2), torch.rand(2) * 0.5

    def jvp(kernel):
        with jvp_attention(kernel):
            return torch.func.jvp(
                lambda z_, t_, h_: net(z_, t_, h_, torch.tensor([0, 2])), (z, t, h), (v, torch.ones(2), torch.ones(2))
            )

    with (
        mock.patch.object(jvp_layers.LinearWithJVP, "apply", wraps=jvp_layers.LinearWithJVP.apply) as lin,
        mock.patch.object(jvp_layers.Conv2dWithJVP, "apply", wraps=jvp_layers.Conv2dWithJVP.apply) as conv,
    ):
        fused = jvp("fused")
        assert lin.call_count > 0 and conv.call_count > 0
        lin.reset_mock()
        explicit = jvp("explicit")
        assert lin.call_count == 0  # the baseline keeps torch's own rules
    assert fused[1].abs().max() > 1e-3
    for a, b in zip(fused, explicit):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert F.linear is jvp_layers._linear  # nothing patched outside the block
