"""Backbone contract tests, driven by the BACKBONES registry (CPU, small models only)."""

from __future__ import annotations

import inspect

import pytest
import torch

from onestep.backbones import attention as attention_module
from onestep.backbones import jvp_attention
from onestep.backbones.dit import DiT
from onestep.backbones.imf_dit import V_HEAD_PREFIX, IMFDiT
from onestep.backbones.layers import GUIDANCE_KEYS
from onestep.backbones.mlp import MLP
from onestep.registry import BACKBONES, ConfigError

# Per-name kwargs for CPU tests; registered backbones above MAX_TEST_PARAMS get only the meta-device
# attribute test here (dit_s_2 has its own smoke test).
TEST_KWARGS = {
    "dit": dict(input_shape=(3, 8, 8), depth=2, hidden_size=64, num_heads=4, patch_size=4),
    "dit_s_2": dict(input_shape=(4, 8, 8)),
    "dit_s_4": dict(input_shape=(4, 8, 8)),
    "mlp_toy": dict(input_shape=(3,)),
}
MAX_TEST_PARAMS = 5_000_000
NUM_CLASSES = 3


def _param_count(name: str, **kwargs) -> int:
    with torch.device("meta"):
        net = BACKBONES.build(name, **kwargs)
    return sum(p.numel() for p in net.parameters())


def _small_names() -> list[str]:
    return [n for n in BACKBONES.names() if _param_count(n, **TEST_KWARGS.get(n, {})) <= MAX_TEST_PARAMS]


SMALL = _small_names()


def _build(name: str, num_classes: int = NUM_CLASSES, dtype=torch.float32, perturb: bool = True, seed: int = 0):
    """Build a backbone and add small noise to every parameter so zero-initialised layers pass gradients."""
    torch.manual_seed(seed)
    net = BACKBONES.build(name, num_classes=num_classes, **TEST_KWARGS.get(name, {})).to(dtype)
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return net


def _inputs(net, batch: int = 4, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *net.input_shape, generator=g).to(dtype)
    t = torch.rand(batch, generator=g).to(dtype)
    h = t * torch.rand(batch, generator=g).to(dtype)
    y = torch.arange(batch) % (net.num_classes + 1) if net.num_classes else None
    return x, t, h, y


def test_small_set_covers_the_test_variants():
    assert {"test_dit", "test_mlp", "mlp_toy", "dit"} <= set(SMALL)


def test_dit_s_2_smoke():
    net = _build("dit_s_2", perturb=True)
    x, t, h, y = _inputs(net, batch=2)
    out, (feat,) = net.forward_features(x, t, h, y, blocks=[-1])
    assert out.shape == x.shape and feat.shape == (2, 16, 384)
    (out * torch.randn_like(out)).sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches: {dead}"


@pytest.mark.parametrize("name", BACKBONES.names())
def test_contract_attributes(name):
    with torch.device("meta"):
        net = BACKBONES.build(name, num_classes=10, **TEST_KWARGS.get(name, {}))
    assert isinstance(net, torch.nn.Module)
    assert isinstance(net.input_shape, tuple) and all(isinstance(s, int) for s in net.input_shape)
    assert net.num_classes == 10
    assert isinstance(net.num_blocks, int) and net.num_blocks >= 1
    assert isinstance(net.encoder_blocks, tuple) and net.encoder_blocks
    assert all(0 <= b < net.num_blocks for b in net.encoder_blocks)
    assert net.cond_keys in ((), GUIDANCE_KEYS)
    params = inspect.signature(BACKBONES.get(name)).parameters
    assert "input_shape" in params and params["num_classes"].default == 0


def test_dit_encoder_block_is_depth_over_four():
    with torch.device("meta"):
        assert BACKBONES.build("dit_b_2").encoder_blocks == (3,)
        assert BACKBONES.build("dit_xl_2").encoder_blocks == (7,)
    assert BACKBONES.build("mlp_toy", depth=4).encoder_blocks == (2,)


def test_dit_b_2_parameter_count():
    count = _param_count("dit_b_2", input_shape=(4, 32, 32), num_classes=1000)
    assert abs(count - 131e6) < 1.5e6, count


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
def test_output_shape(name, num_classes):
    net = _build(name, num_classes=num_classes, perturb=False)
    x, t, h, y = _inputs(net)
    assert net(x, t, h, y).shape == x.shape
    assert net(x, t).shape == x.shape


@pytest.mark.parametrize("name", SMALL)
def test_gradients_reach_every_parameter(name):
    net = _build(name)
    x, t, h, y = _inputs(net)
    out = net(x, t, h, y)
    (out * torch.randn_like(out)).sum().backward()
    # forward() is the u path only: an iMF auxiliary v-head gets its gradient through forward_aux.
    aux = V_HEAD_PREFIX if getattr(net, "has_aux_head", False) else None
    dead = [
        n
        for n, p in net.named_parameters()
        if (p.grad is None or not p.grad.abs().sum() > 0) and not (aux and n.startswith(aux))
    ]
    assert not dead, f"no gradient reaches: {dead}"


@pytest.mark.parametrize("name", SMALL)
def test_stray_guidance_conditions_are_rejected(name):
    net = _build(name, perturb=False)
    x, t, h, y = _inputs(net, batch=2)
    with torch.no_grad():
        if net.cond_keys:
            with pytest.raises(ValueError, match="allowed: omega, t_min, t_max"):
                net(x, t, h, y, cond={"scale": 2.0})
        else:
            with pytest.raises(ValueError, match="not built with guidance conditions.*guidance_conditions=True"):
                net(x, t, h, y, cond={"omega": 2.0})
            assert torch.equal(net(x, t, h, y, cond=None), net(x, t, h, y, cond={}))


@pytest.mark.parametrize("name", SMALL)
def test_forward_features_matches_forward(name):
    net = _build(name)
    x, t, h, y = _inputs(net)
    with torch.no_grad():
        expected = net(x, t, h, y)
        blocks = [0, *net.encoder_blocks, -1]
        out, feats = net.forward_features(x, t, h, y, blocks=blocks)
    assert torch.equal(out, expected)
    assert len(feats) == len(blocks)
    for feat in feats:
        if isinstance(net, (DiT, IMFDiT)):  # IMFDiT: patch tokens only, without the prefix tokens
            grid = (net.input_shape[1] // net.patch_size) * (net.input_shape[2] // net.patch_size)
            assert feat.shape == (x.shape[0], grid, net.hidden_size)
        elif isinstance(net, MLP):
            assert feat.shape == (x.shape[0], net.width)
        else:
            assert feat.shape[0] == x.shape[0]
    # Different blocks give different activations; negative indices count from the end.
    assert not torch.equal(feats[0], feats[-1]) or net.num_blocks == 1
    with torch.no_grad():
        _, (last,) = net.forward_features(x, t, h, y, blocks=[net.num_blocks - 1])
        _, (first,) = net.forward_features(x, t, h, y, blocks=[-net.num_blocks])
    assert torch.equal(last, feats[-1]) and torch.equal(first, feats[0])


@pytest.mark.parametrize("name", SMALL)
def test_forward_features_rejects_out_of_range_blocks(name):
    net = _build(name, perturb=False)
    x, t, h, y = _inputs(net, batch=2)
    for bad in (net.num_blocks, -net.num_blocks - 1):
        with pytest.raises(ValueError, match="valid"):
            net.forward_features(x, t, h, y, blocks=[bad])


@pytest.mark.parametrize("name", SMALL)
def test_class_conditioning(name):
    net = _build(name)
    x, t, h, _ = _inputs(net)
    batch = x.shape[0]
    with torch.no_grad():
        out0 = net(x, t, h, torch.zeros(batch, dtype=torch.long))
        out1 = net(x, t, h, torch.ones(batch, dtype=torch.long))
        null = net(x, t, h, torch.full((batch,), NUM_CLASSES, dtype=torch.long))
        none = net(x, t, h, None)
    assert not torch.allclose(out0, out1)
    assert torch.equal(none, null)
    # Unconditional nets ignore y.
    uncond = _build(name, num_classes=0)
    with torch.no_grad():
        assert torch.equal(uncond(x, t, h, torch.ones(batch, dtype=torch.long)), uncond(x, t, h))


@pytest.mark.parametrize("name", SMALL)
def test_time_and_interval_change_the_output(name):
    net = _build(name)
    x, t, h, y = _inputs(net)
    with torch.no_grad():
        base = net(x, t, h, y)
        if isinstance(net, IMFDiT):  # conditions on h only, by design (as the released iMF code)
            assert torch.equal(base, net(x, t * 0.5, h, y))
        else:
            assert not torch.allclose(base, net(x, t * 0.5, h, y))
        assert not torch.allclose(base, net(x, t, h * 0.5, y))
        assert torch.equal(net(x, t, None, y), net(x, t, torch.zeros_like(t), y))


def _meanflow_style_jvp(net, x, t, h, y, v, kernel="explicit"):
    with jvp_attention(kernel):
        return torch.func.jvp(
            lambda z, tt, hh: net(z, tt, hh, y), (x, t, h), (v, torch.ones_like(t), torch.ones_like(h))
        )


@pytest.mark.parametrize("name", ["test_dit", "test_mlp"])
@pytest.mark.parametrize("kernel", attention_module.JVP_KERNELS)
def test_jvp_matches_finite_difference(name, kernel):
    net = _build(name, dtype=torch.float64)
    x, t, h, y = _inputs(net, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    dt = torch.randn(t.shape, generator=g, dtype=torch.float64)
    dh = torch.randn(h.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        with jvp_attention(kernel):
            out, tangent = torch.func.jvp(lambda a, b, c: net(a, b, c, y), (x, t, h), (dx, dt, dh))
        eps = 1e-6
        plus = net(x + eps * dx, t + eps * dt, h + eps * dh, y)
        minus = net(x - eps * dx, t - eps * dt, h - eps * dh, y)
        expected = (plus - minus) / (2 * eps)
        torch.testing.assert_close(out, net(x, t, h, y), rtol=1e-12, atol=1e-12)
    assert tangent.abs().max() > 1e-3
    torch.testing.assert_close(tangent, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["test_dit", "test_mlp"])
@pytest.mark.parametrize("kernel", attention_module.JVP_KERNELS)
def test_backward_through_jvp_primal_matches_plain_backward(name, kernel):
    net = _build(name, dtype=torch.float64)
    x, t, h, y = _inputs(net, dtype=torch.float64)
    v = torch.randn_like(x)
    u, dudt = _meanflow_style_jvp(net, x, t, h, y, v, kernel)
    target = (v - h[:, None, None, None] * dudt if x.ndim == 4 else v - h[:, None] * dudt).detach()
    ((u - target) ** 2).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    ((net(x, t, h, y) - target) ** 2).sum().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("name", ["test_dit", "test_mlp"])
def test_jvp_with_features_keeps_features_connected(name):
    net = _build(name)
    x, t, h, y = _inputs(net)
    v = torch.randn_like(x)
    blocks = list(net.encoder_blocks)

    def fn(z, tt, hh):
        out, feats = net.forward_features(z, tt, hh, y, blocks=blocks)
        return out, feats

    with jvp_attention():
        u, dudt, feats = torch.func.jvp(fn, (x, t, h), (v, torch.ones_like(t), torch.ones_like(h)), has_aux=True)
    with torch.no_grad():
        _, expected = net.forward_features(x, t, h, y, blocks=blocks)
    torch.testing.assert_close(feats[0], expected[0])
    assert feats[0].requires_grad and u.requires_grad
    param = net.blocks[0].fc1.weight if isinstance(net, MLP) else net.blocks[0].attn.qkv.weight
    (grad,) = torch.autograd.grad(feats[0].pow(2).sum(), param)
    assert grad.abs().sum() > 0


def test_fused_attention_without_context_has_a_hint():
    net = _build("test_dit")
    x, t, h, y = _inputs(net)
    try:
        torch.func.jvp(lambda z: net(z, t, h, y), (x,), (torch.randn_like(x),))
    except NotImplementedError as exc:  # fused SDPA kernels have no forward-mode AD
        assert "jvp_attention" in str(exc)


def test_attention_paths_agree():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    fused = attention_module.attention(q, k, v)
    for kernel in attention_module.JVP_KERNELS:
        with jvp_attention(kernel):
            torch.testing.assert_close(attention_module.attention(q, k, v), fused)
    with pytest.raises(ValueError, match="explicit"):
        with jvp_attention("nope"):
            pass


def _qkv_net(kernel, tangent_grad=True):
    """A weight W -> (x W split into q, k, v) -> attention -> (B, heads, N, d); x (2, 9, 16)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 48, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 9, 16, generator=g, dtype=torch.float64)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def fn(inp):
        q, k, v = (inp @ weight).reshape(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return attention_module.attention(q, k, v)

    with jvp_attention(kernel, tangent_grad=tangent_grad):
        out, tangent = torch.func.jvp(fn, (x,), (dx,))
    return weight, out, tangent


def test_fused_jvp_rule_matches_explicit_in_value_tangent_and_both_gradients(monkeypatch):
    # Tiny chunks so the chunked tangent loop runs several times.
    monkeypatch.setattr(attention_module, "TANGENT_CHUNK_ELEMENTS", 81)
    w_f, out_f, tan_f = _qkv_net("fused")
    w_e, out_e, tan_e = _qkv_net("explicit")
    torch.testing.assert_close(out_f, out_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tan_f, tan_e, rtol=1e-10, atol=1e-12)
    assert tan_e.abs().max() > 0.1
    # Gradient through the primal (SDPA recomputed in backward) ...
    for a, b in ((out_f, out_e), (tan_f, tan_e)):
        (g_f,) = torch.autograd.grad((a * a.cos()).sum(), w_f, retain_graph=True)
        (g_e,) = torch.autograd.grad((b * b.cos()).sum(), w_e, retain_graph=True)
        # ... and through the tangent (the rule's own ops) agree with the elementary-op path.
        torch.testing.assert_close(g_f, g_e, rtol=1e-9, atol=1e-10)
        assert g_e.abs().max() > 1e-3


def test_fused_jvp_rule_without_tangent_graph():
    weight, out, tangent = _qkv_net("fused", tangent_grad=False)
    assert tangent.grad_fn is None and out.grad_fn is not None
    _, _, expected = _qkv_net("explicit")
    torch.testing.assert_close(tangent, expected.detach(), rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), weight)
    assert grad.abs().sum() > 0


def test_fused_jvp_rule_with_missing_tangents():
    g = torch.Generator().manual_seed(4)
    q, k, v, dv = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(4))
    # Only v moves: the tangent is attention(q, k, dv).
    with jvp_attention("fused"):
        _, tangent = torch.func.jvp(lambda vv: attention_module.attention(q, k, vv), (v,), (dv,))
    torch.testing.assert_close(tangent, attention_module.attention(q, k, dv))
    # Only q moves: compare with the explicit path.
    with jvp_attention("fused"):
        _, t_f = torch.func.jvp(lambda qq: attention_module.attention(qq, k, v), (q,), (dv,))
    with jvp_attention("explicit"):
        _, t_e = torch.func.jvp(lambda qq: attention_module.attention(qq, k, v), (q,), (dv,))
    torch.testing.assert_close(t_f, t_e)


@pytest.mark.parametrize("kernel", attention_module.JVP_KERNELS)
def test_jvp_kernels_under_bf16_autocast(kernel):
    # bf16 q, k, v (a bf16 projection under autocast) through every kernel's forward-mode rule: the
    # primal and tangent come back in bf16 and agree with the fp32 explicit path. (sdpa_math once
    # failed here on CUDA: the MATH backend's own upcast mixed the JVP's dtypes.)
    g = torch.Generator().manual_seed(6)
    q, k, v, dq = (torch.randn(2, 2, 16, 8, generator=g) for _ in range(4))
    weight = torch.eye(8) + 0.1 * torch.randn(8, 8, generator=g)
    with jvp_attention("explicit"):
        ref, expected = torch.func.jvp(lambda qq: attention_module.attention(qq @ weight, k, v), (q,), (dq,))
    with torch.autocast("cpu", dtype=torch.bfloat16), jvp_attention(kernel):
        out, tangent = torch.func.jvp(lambda qq: attention_module.attention(qq @ weight, k, v), (q,), (dq,))
    assert out.dtype == tangent.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    torch.testing.assert_close(tangent.float(), expected, rtol=0.05, atol=0.05)


def test_bf16_autocast():
    net = _build("test_dit")
    x, t, h, y = _inputs(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, feats = net.forward_features(x, t, h, y, blocks=[-1])
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    with torch.no_grad():
        ref = net(x, t, h, y)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-2


def test_scalar_times_broadcast():
    net = _build("test_mlp")
    x, t, h, y = _inputs(net)
    with torch.no_grad():
        assert torch.equal(net(x, 0.5, 0.25), net(x, torch.full((4,), 0.5), torch.full((4,), 0.25)))


def test_bad_shapes():
    with pytest.raises(ValueError, match="patch_size"):
        BACKBONES.build("test_dit", input_shape=(4, 9, 9))
    with pytest.raises(ValueError, match="input_shape"):
        BACKBONES.build("test_dit", input_shape=(4, 8))
    with pytest.raises(ValueError, match="input_shape"):
        BACKBONES.build("test_mlp", input_shape=(3, 4))
    net = _build("test_dit", perturb=False)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(2, 4, 16, 16), torch.rand(2))


def test_registry_validates_kwargs():
    BACKBONES.bind("dit_b_2", {"input_shape": [4, 32, 32], "num_classes": 1000})
    BACKBONES.bind("dit", {"depth": 4, "mlp_ratio": 4, "time_scale": 1.0})
    with pytest.raises(ConfigError, match="depth"):
        BACKBONES.bind("dit", {"depth": "deep"})
    with pytest.raises(ConfigError, match="allowed"):
        BACKBONES.bind("dit_b_2", {"depth": 4})


def test_jvp_in_train_mode_with_dropout_uses_one_mask():
    torch.manual_seed(0)
    net = BACKBONES.build("test_dit", num_classes=NUM_CLASSES, dropout=0.3).double().train()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, h, y = _inputs(net, dtype=torch.float64)
    v = torch.randn_like(x)
    eps = 1e-6
    with jvp_attention():
        torch.manual_seed(7)
        u, dudx = torch.func.jvp(lambda z: net(z, t, h, y), (x,), (v,))
        torch.manual_seed(7)
        assert torch.equal(u, net(x, t, h, y))
        with torch.no_grad():
            torch.manual_seed(7)
            plus = net(x + eps * v, t, h, y)
            torch.manual_seed(7)
            minus = net(x - eps * v, t, h, y)
    torch.testing.assert_close(dudx, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-7)
