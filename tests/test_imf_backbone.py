"""Guidance conditions in the backbone contract, and the iMF in-context DiT (CPU, tiny models)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from onestep.backbones import jvp_attention
from onestep.backbones.attention import JVP_KERNELS
from onestep.backbones.imf_dit import (
    V_HEAD_PREFIX,
    IMFDiT,
    apply_rope,
    inference_state_dict,
    rope_angles,
)
from onestep.backbones.layers import GUIDANCE_KEYS
from onestep.registry import BACKBONES

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 3
GUIDED = ["test_dit", "test_mlp", "test_unet"]


def _perturb(net: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised gates / output layers pass signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def _imf(num_classes: int = NUM_CLASSES, dtype=torch.float32, perturb: bool = True, **kw) -> IMFDiT:
    torch.manual_seed(0)
    net = BACKBONES.build("test_imf_dit", num_classes=num_classes, **kw).to(dtype)
    return _perturb(net) if perturb else net


def _inputs(net, batch: int = 3, dtype=torch.float32, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *net.input_shape, generator=g).to(dtype)
    t = torch.rand(batch, generator=g).to(dtype)
    h = t * torch.rand(batch, generator=g).to(dtype)
    y = torch.arange(batch) % (net.num_classes + 1) if net.num_classes else None
    cond = {
        "omega": (1 + 7 * torch.rand(batch, generator=g)).to(dtype),
        "t_min": (0.5 * torch.rand(batch, generator=g)).to(dtype),
        "t_max": (0.5 + 0.5 * torch.rand(batch, generator=g)).to(dtype),
    }
    return x, t, h, y, cond


def _count(name: str, **kw) -> int:
    with torch.device("meta"):
        net = BACKBONES.build(name, num_classes=1000, input_shape=(4, 32, 32), **kw)
    return sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    "name, inference, training",
    [
        ("imf_dit_b_2", 88.95e6, 145.6e6),
        ("imf_dit_m_2", 173.9e6, 230.6e6),
        ("imf_dit_l_2", 409.1e6, 509.8e6),
        ("imf_dit_xl_2", 610.4e6, 711.1e6),
    ],
)
def test_parameter_counts(name, inference, training):
    n_inf, n_train = _count(name, aux_head=False), _count(name)
    assert abs(n_inf - inference) < 0.01 * inference, n_inf
    assert abs(n_train - training) < 0.01 * training, n_train


def test_size_attributes():
    with torch.device("meta"):
        b2 = BACKBONES.build("imf_dit_b_2")
        xl = BACKBONES.build("imf_dit_xl_2", aux_head=False)
    assert (b2.num_blocks, b2.trunk_depth, b2.aux_head_depth, b2.hidden_size, b2.num_heads) == (12, 4, 8, 768, 12)
    assert (xl.num_blocks, xl.trunk_depth, xl.hidden_size, xl.num_heads) == (48, 40, 1024, 16)
    assert b2.encoder_blocks == (3,) and xl.encoder_blocks == (12,)
    assert b2.has_aux_head and not xl.has_aux_head and xl.v_head is None
    assert b2.cond_keys == xl.cond_keys == GUIDANCE_KEYS
    assert b2.num_prefix_tokens == 20 and b2.seq_len == 276
    assert b2.blocks[0].mlp.w1.out_features == 2048 and xl.blocks[0].mlp.w1.out_features == 2730
    assert b2.blocks[0].attn.q_proj.bias is None and b2.blocks[0].mlp.w2.bias is None


# ------------------------------------------------------------------------------ the iMF DiT
@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
def test_shapes_and_fresh_output(num_classes):
    net = _imf(num_classes, perturb=False)
    x, t, h, y, cond = _inputs(net)
    u, v, feats = net.forward_aux(x, t, h, y, cond=cond, blocks=[0, -1])
    assert u.shape == v.shape == x.shape and not u.abs().any() and not v.abs().any()  # zero final layers
    assert [f.shape for f in feats] == [(3, 16, 32)] * 2  # patch tokens only
    assert net(x, t).shape == x.shape


def test_forward_equals_forward_aux_u_and_features_equal_manual_pass():
    net = _imf()
    x, t, h, y, cond = _inputs(net)
    blocks = [0, *net.encoder_blocks, 2]
    with torch.no_grad():
        u = net(x, t, h, y, cond=cond)
        u_f, feats = net.forward_features(x, t, h, y, blocks=blocks, cond=cond)
        u_a, v, feats_a = net.forward_aux(x, t, h, y, cond=cond, blocks=blocks)
        # Manual pass: sequence, RoPE angles, blocks, final layer on the patch tokens.
        seq = net.sequence(x, h, y, cond)
        assert seq.shape == (3, net.num_prefix_tokens + 16, 32)
        cos, sin = rope_angles(seq.shape[1], net.head_dim)
        manual = []
        for block in net.blocks:
            seq = block(seq, cos, sin)
            manual.append(seq[:, net.num_prefix_tokens :])
        u_manual = net.unpatchify(net.final_layer(manual[-1]))
        v_seq = net.sequence(x, h, y, cond)
        for block in net.blocks[: net.trunk_depth]:
            v_seq = block(v_seq, cos, sin)
        for block in net.v_head.blocks:
            v_seq = block(v_seq, cos, sin)
        v_manual = net.unpatchify(net.v_head.final_layer(v_seq[:, net.num_prefix_tokens :]))
    assert torch.equal(u, u_f) and torch.equal(u, u_a)
    torch.testing.assert_close(u, u_manual)
    torch.testing.assert_close(v, v_manual)
    assert not torch.allclose(u, v)
    for index, f, fa in zip(blocks, feats, feats_a):
        torch.testing.assert_close(f, manual[index])
        assert torch.equal(f, fa)


def test_gradients_reach_every_parameter():
    net = _imf()
    x, t, h, y, cond = _inputs(net)
    u, v, (feat,) = net.forward_aux(x, t, h, y, cond=cond, blocks=net.encoder_blocks)
    (u.square().sum() + (v * torch.randn_like(v)).sum() + feat.mean()).backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches: {dead}"
    # forward() alone trains everything but the v-head.
    net.zero_grad(set_to_none=True)
    (net(x, t, h, y, cond=cond) * torch.randn_like(x)).sum().backward()
    for n, p in net.named_parameters():
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert has_grad != n.startswith(V_HEAD_PREFIX), n


def test_inference_model_without_v_head_loads_training_weights():
    train = _imf()
    infer = BACKBONES.build("test_imf_dit", num_classes=NUM_CLASSES, aux_head=False)
    assert not infer.has_aux_head and not any(k.startswith(V_HEAD_PREFIX) for k in infer.state_dict())
    assert all(k.startswith(V_HEAD_PREFIX) for k in set(train.state_dict()) - set(infer.state_dict()))
    infer.load_state_dict(train.inference_state_dict())  # strict
    infer.load_state_dict(inference_state_dict(train.state_dict()))
    x, t, h, y, cond = _inputs(train)
    with torch.no_grad():
        assert torch.equal(infer(x, t, h, y, cond=cond), train(x, t, h, y, cond=cond))
    with pytest.raises(ValueError, match="aux_head=False"):
        infer.forward_aux(x, t, h, y)


def test_conditions_h_y_and_guidance_but_not_t():
    net = _imf()
    x, t, h, y, cond = _inputs(net)
    with torch.no_grad():
        base = net(x, t, h, y, cond=cond)
        assert torch.equal(base, net(x, torch.rand(3), h, y, cond=cond))  # t is ignored
        assert not torch.allclose(base, net(x, t, h * 0.5, y, cond=cond))
        assert not torch.allclose(base, net(x, t, h, (y + 1) % NUM_CLASSES, cond=cond))
        for key in GUIDANCE_KEYS:
            changed = dict(cond, **{key: cond[key] * 0.7 + (0.3 if key == "omega" else 0.1)})
            assert not torch.allclose(base, net(x, t, h, y, cond=changed)), key
        _, v = net.forward_aux(x, t, h, y, cond=cond)[:2]
        _, v2 = net.forward_aux(x, t, h, y, cond=dict(cond, omega=cond["omega"] + 1))[:2]
        assert not torch.allclose(v, v2)


def test_unconditional_keeps_the_layout_and_ignores_y():
    net = _imf(num_classes=0)
    assert net.y_embedder is None and net.num_prefix_tokens == 20
    x, t, h, _, cond = _inputs(net)
    with torch.no_grad():
        assert torch.equal(net(x, t, h, torch.ones(3, dtype=torch.long), cond=cond), net(x, t, h, cond=cond))


def test_rejects_bad_shapes_and_settings():
    with pytest.raises(ValueError, match="patch_size"):
        BACKBONES.build("test_imf_dit", input_shape=(4, 9, 9))
    with pytest.raises(ValueError, match="aux_head_depth"):
        BACKBONES.build("imf_dit", depth=4, aux_head_depth=5, hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match="even"):
        BACKBONES.build("imf_dit", depth=2, aux_head_depth=1, hidden_size=30, num_heads=2)
    net = _imf(perturb=False)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(2, 4, 16, 16), torch.rand(2))


@pytest.mark.parametrize("aux_head_depth", [0, 3])
def test_head_depth_extremes(aux_head_depth):
    torch.manual_seed(0)
    net = _perturb(
        BACKBONES.build(
            "imf_dit",
            input_shape=(2, 4, 4),
            depth=3,
            aux_head_depth=aux_head_depth,
            hidden_size=16,
            num_heads=2,
            frequency_size=16,
        )
    )
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        u, v, _ = net.forward_aux(x, torch.rand(2), torch.rand(2))
    assert u.shape == v.shape == x.shape and not torch.allclose(u, v)


def test_bf16_autocast():
    net = _imf()
    x, t, h, y, cond = _inputs(net)
    with torch.no_grad():
        ref = net(x, t, h, y, cond=cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, v, _ = net.forward_aux(x, t, h, y, cond=cond)
    assert torch.isfinite(out.float()).all() and torch.isfinite(v.float()).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-2


# -------------------------------------------------------------------------------------- RoPE
def test_rope_preserves_norms_and_matches_complex_rotation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 11, 8, generator=g, dtype=torch.float64)
    cos, sin = rope_angles(11, 8, dtype=torch.float64)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotated[..., 0, :], x[..., 0, :])  # position 0: identity
    # Interleaved pairs (x[2i], x[2i+1]) as complex numbers times exp(i·m·θ^(-2i/d)).
    freqs = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    phase = torch.polar(
        torch.ones(11, 4, dtype=torch.float64), torch.arange(11.0, dtype=torch.float64)[:, None] * freqs
    )
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, 11, 4, 2).contiguous()) * phase).reshape(
        x.shape
    )
    torch.testing.assert_close(rotated, expected)


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(1)
    length, dim = 9, 16
    q, k = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    cos, sin = rope_angles(length, dim, dtype=torch.float64)
    q_at = apply_rope(q.expand(length, dim), cos, sin)  # the same vector at every position
    k_at = apply_rope(k.expand(length, dim), cos, sin)
    scores = q_at @ k_at.T  # scores[m, n] = <R_m q, R_n k>
    for m in range(length - 1):
        for n in range(length - 1):
            torch.testing.assert_close(scores[m + 1, n + 1], scores[m, n])
    torch.testing.assert_close(scores.diagonal(), torch.full((length,), float(q @ k), dtype=torch.float64))


# ------------------------------------------------------------------------------------- JVP
def _imf_jvp(net, kernel, x, h, y, cond, tangents):
    dx, dh, dw, dlo, dhi = tangents

    def fn(z, hh, w, lo, hi):
        u, v, _ = net.forward_aux(z, torch.zeros_like(hh), hh, y, cond={"omega": w, "t_min": lo, "t_max": hi})
        return u, v

    primals = (x, h, cond["omega"], cond["t_min"], cond["t_max"])
    with jvp_attention(kernel):
        return torch.func.jvp(fn, primals, (dx, dh, dw, dlo, dhi)), fn, primals


def test_jvp_through_imf_dit_matches_finite_difference_for_every_kernel():
    net = _imf(dtype=torch.float64).eval()
    x, t, h, y, cond = _inputs(net, batch=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    tangents = [torch.randn(a.shape, generator=g, dtype=torch.float64) for a in (x, h, h, h, h)]
    results = {}
    for kernel in JVP_KERNELS:
        ((u, v), (du, dv)), fn, primals = _imf_jvp(net, kernel, x, h, y, cond, tangents)
        results[kernel] = (u, v, du, dv)
    eps = 1e-6
    with torch.no_grad():
        plus = fn(*(p + eps * d for p, d in zip(primals, tangents)))
        minus = fn(*(p - eps * d for p, d in zip(primals, tangents)))
        u_ref, v_ref = fn(*primals)
    fd_u, fd_v = ((a - b) / (2 * eps) for a, b in zip(plus, minus))
    assert fd_u.abs().max() > 1e-3 and fd_v.abs().max() > 1e-3
    for kernel, (u, v, du, dv) in results.items():
        torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12, msg=kernel)
        torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12, msg=kernel)
        torch.testing.assert_close(du, fd_u, rtol=1e-6, atol=1e-7, msg=kernel)
        torch.testing.assert_close(dv, fd_v, rtol=1e-6, atol=1e-7, msg=kernel)
        torch.testing.assert_close(du, results["explicit"][2], rtol=1e-10, atol=1e-12, msg=kernel)
        torch.testing.assert_close(dv, results["explicit"][3], rtol=1e-10, atol=1e-12, msg=kernel)


def test_meanflow_style_jvp_has_no_t_component():
    net = _imf(dtype=torch.float64)
    x, t, h, y, cond = _inputs(net, batch=2, dtype=torch.float64)
    v = torch.randn_like(x)
    with jvp_attention():
        _, with_t = torch.func.jvp(
            lambda z, tt, hh: net(z, tt, hh, y, cond=cond), (x, t, h), (v, torch.ones_like(t), torch.ones_like(h))
        )
        _, without_t = torch.func.jvp(
            lambda z, tt, hh: net(z, tt, hh, y, cond=cond), (x, t, h), (v, torch.zeros_like(t), torch.ones_like(h))
        )
    assert torch.equal(with_t, without_t)


@pytest.mark.parametrize("kernel", JVP_KERNELS)
def test_jvp_through_a_guided_dit(kernel):
    torch.manual_seed(0)
    net = _perturb(BACKBONES.build("test_dit", num_classes=NUM_CLASSES, guidance_conditions=True).double())
    x, t, h, y, cond = _inputs(net, batch=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    primals = (x, t, h, cond["omega"], cond["t_min"], cond["t_max"])
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=torch.float64) for p in primals)

    def fn(z, tt, hh, w, lo, hi):
        return net(z, tt, hh, y, cond={"omega": w, "t_min": lo, "t_max": hi})

    with jvp_attention(kernel):
        out, tangent = torch.func.jvp(fn, primals, tangents)
    eps = 1e-6
    with torch.no_grad():
        fd = (
            fn(*(p + eps * d for p, d in zip(primals, tangents)))
            - fn(*(p - eps * d for p, d in zip(primals, tangents)))
        ) / (2 * eps)
    assert fd.abs().max() > 1e-3
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------- guidance in the contract
def test_cond_defaults_broadcast_and_errors():
    net = _imf()
    x, t, h, y, cond = _inputs(net)
    with torch.no_grad():
        unguided = net(x, t, h, y)
        assert torch.equal(unguided, net(x, t, h, y, cond={}))
        assert torch.equal(unguided, net(x, t, h, y, cond={"omega": 1.0, "t_min": 0.0, "t_max": 1.0}))
        assert torch.equal(unguided, net(x, t, h, y, cond={"omega": torch.ones(3), "t_min": torch.tensor(0.0)}))
        partial = net(x, t, h, y, cond={"omega": cond["omega"]})
        assert torch.equal(partial, net(x, t, h, y, cond=dict(omega=cond["omega"], t_min=0.0, t_max=1.0)))
        assert torch.equal(net(x, t, h, y, cond={"omega": 4.0}), net(x, t, h, y, cond={"omega": torch.full((3,), 4.0)}))
        # Existing positional calls still work.
        assert torch.equal(net.forward(x, t, h, y), unguided)
    with pytest.raises(ValueError, match=r"unknown cond key\(s\) 'scale'.*allowed: omega, t_min, t_max"):
        net(x, t, h, y, cond={"omega": 2.0, "scale": 1.0})
    with pytest.raises(ValueError, match="shape"):
        net(x, t, h, y, cond={"omega": torch.ones(2)})
    with pytest.raises(ValueError, match="dict"):
        net(x, t, h, y, cond=[2.0])


@pytest.mark.parametrize("name", GUIDED)
def test_non_guided_backbone_rejects_cond(name):
    net = BACKBONES.build(name)
    assert net.cond_keys == ()
    x = torch.randn(2, *net.input_shape)
    with pytest.raises(ValueError) as info:
        net(x, torch.rand(2), cond={"omega": 2.0})
    message = str(info.value)
    assert "\n" not in message and "not built with guidance conditions" in message
    assert "guidance_conditions=True" in message


# Fingerprints (names and shapes) of state dicts built with num_classes=10 before guidance
# conditions existed: checkpoints written then still load.
OLD_FINGERPRINTS = {
    "dit_b_2": (135, "876ca5adb83dcb44"),
    "test_dit": (35, "e1fad5726859a308"),
    "mlp_toy": (37, "c7c0cafc8ec1a0fc"),
    "test_mlp": (25, "b67886c9136f697c"),
    "unet_cifar": (421, "afbc52b4ccd8b9d9"),
    "test_unet": (147, "fdaf940ebe5f4b52"),
}


def _fingerprint(state) -> tuple[int, str]:
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state.items()))
    return len(state), hashlib.sha256(lines.encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(OLD_FINGERPRINTS))
def test_guidance_off_keeps_the_state_dict_keys(name):
    with torch.device("meta"):
        off = BACKBONES.build(name, num_classes=10)
        default = BACKBONES.build(name, num_classes=10, guidance_conditions=False)
        on = BACKBONES.build(name, num_classes=10, guidance_conditions=True)
    assert _fingerprint(off.state_dict()) == _fingerprint(default.state_dict()) == OLD_FINGERPRINTS[name]
    extra = set(on.state_dict()) - set(off.state_dict())
    assert set(off.state_dict()) <= set(on.state_dict()) and extra
    assert {k.split(".")[1] for k in extra} == set(GUIDANCE_KEYS)
    assert off.cond_keys == () and on.cond_keys == GUIDANCE_KEYS


@pytest.mark.parametrize("name", GUIDED)
def test_fresh_guided_net_equals_the_unguided_one(name):
    torch.manual_seed(0)
    off = BACKBONES.build(name, num_classes=NUM_CLASSES)
    torch.manual_seed(0)
    on = BACKBONES.build(name, num_classes=NUM_CLASSES, guidance_conditions=True)
    # Same seed: every shared weight is identical (the guidance embedders are drawn last).
    on_state = on.state_dict()
    assert all(torch.equal(v, on_state[k]) for k, v in off.state_dict().items())
    # With arbitrary (perturbed) shared weights, the zero-initialised guidance output keeps them equal.
    _perturb(off)
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert not unexpected and missing and all(k.split(".")[1] in GUIDANCE_KEYS for k in missing)
    off.eval(), on.eval()
    x, t, h, y, cond = _inputs(off)
    with torch.no_grad():
        expected = off(x, t, h, y)
        assert torch.equal(on(x, t, h, y, cond=cond), expected)
        assert torch.equal(on(x, t, h, y), expected)


@pytest.mark.parametrize("name", GUIDED)
def test_guidance_inputs_change_a_guided_net(name):
    torch.manual_seed(0)
    net = _perturb(BACKBONES.build(name, num_classes=NUM_CLASSES, guidance_conditions=True)).eval()
    x, t, h, y, cond = _inputs(net)
    with torch.no_grad():
        base = net(x, t, h, y, cond=cond)
        unguided = net(x, t, h, y)
        assert torch.equal(unguided, net(x, t, h, y, cond={"omega": 1.0, "t_min": 0.0, "t_max": 1.0}))
        assert not torch.allclose(base, unguided)
        for key in GUIDANCE_KEYS:
            changed = dict(cond, **{key: cond[key] * 0.7 + (0.3 if key == "omega" else 0.1)})
            assert not torch.allclose(base, net(x, t, h, y, cond=changed)), key
        out, _ = net.forward_features(x, t, h, y, blocks=net.encoder_blocks, cond=cond)
        assert torch.equal(out, base)


def test_registry_accepts_the_new_options():
    BACKBONES.bind("dit_b_2", {"guidance_conditions": True})
    BACKBONES.bind("dit", {"guidance_conditions": False, "depth": 2})
    BACKBONES.bind("unet_cifar", {"guidance_conditions": True})
    BACKBONES.bind("mlp_toy", {"guidance_conditions": True})
    BACKBONES.bind("imf_dit_xl_2", {"aux_head": False, "num_classes": 1000})
    BACKBONES.bind("imf_dit", {"aux_head_depth": 2, "num_time_tokens": 4, "rope_theta": 100.0})
