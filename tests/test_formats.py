"""onestep.formats: official DiT / SiT / REPA-SiT files as exact onestep velocity models.

The files are tiny state dicts in the official key layout, written by these tests. Their function is
defined by ``ref_forward`` below: an independent forward of the official architecture with plain
torch ops (official position layout [E(col) | E(row)], cos-first time features, timm-style
attention), so every conversion is checked against it in float64.
"""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from gaussian_closed_form import GaussianClosedForm
from torch import nn

from onestep.backbones.dit import DiT
from onestep.backbones.layers import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d, timestep_features
from onestep.formats import (
    SiTTeacher,
    VPEpsilonTeacher,
    describe,
    get_format,
    init_state,
    load_teacher,
    parse_spec,
)
from onestep.formats.arch import STANDARD_HEADS, infer_arch, official_pos_embed
from onestep.formats.convert import permute_residual, residual_permutation, time_flip_matrix
from onestep.formats.vp import T_MAX, T_MIN, ddpm_index, ddpm_log_snr
from onestep.objectives.flow_matching import velocity
from onestep.registry import BACKBONES, FORMATS, REGISTRIES, ConfigError

F64 = torch.float64
D, DEPTH, HEADS, P, C, GRID, CLASSES, FREQ = 32, 2, 2, 2, 4, 4, 5, 256
SIDE = GRID * P


# ------------------------------------------------------------------------------------------------
# Independent reference of the official architecture.


def ref_timestep(t, dim=FREQ, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=F64) / half)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ref_pos_embed(dim, grid):
    """MAE's table: np.meshgrid(w, h) -> grid[0] is the column; [E_{D/2}(col) | E_{D/2}(row)]."""
    cols, rows = torch.meshgrid(torch.arange(grid, dtype=F64), torch.arange(grid, dtype=F64), indexing="xy")

    def one_d(pos, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=F64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_d(cols, dim // 2), one_d(rows, dim // 2)], dim=1)


def ref_forward(sd, x, t, y, heads=HEADS):
    """The official DiT/SiT forward (all output channels) for raw time input t and labels y."""
    weight = sd["x_embedder.proj.weight"]
    d, _, p, _ = weight.shape
    tok = F.conv2d(x, weight, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]

    def lin(h, name):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    def mod(h, shift, scale):
        return F.layer_norm(h, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    c = lin(
        F.silu(lin(ref_timestep(t, sd["t_embedder.mlp.0.weight"].shape[1]).to(x.dtype), "t_embedder.mlp.0")),
        "t_embedder.mlp.2",
    )
    c = c + sd["y_embedder.embedding_table.weight"][y]
    batch, n, _ = tok.shape
    hd = d // heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=-1)
        qkv = lin(mod(tok, sh1, sc1), b + "attn.qkv").reshape(batch, n, 3, heads, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        tok = tok + g1[:, None] * lin(att.transpose(1, 2).reshape(batch, n, d), b + "attn.proj")
        hidden = F.gelu(lin(mod(tok, sh2, sc2), b + "mlp.fc1"), approximate="tanh")
        tok = tok + g2[:, None] * lin(hidden, b + "mlp.fc2")
    sh, sc = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    out = lin(mod(tok, sh, sc), "final_layer.linear")
    g = int(round(n**0.5))
    cout = out.shape[-1] // (p * p)
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(batch, g, g, p, p, cout))
    return out.reshape(batch, cout, g * p, g * p)


def make_state(seed=0, *, d=D, depth=DEPTH, cout=2 * C, classes=CLASSES, projectors=False, dtype=F64):
    """Random official-layout weights (non-zero adaLN and outputs, so every path matters)."""
    gen = torch.Generator().manual_seed(seed)

    def w(*shape, scale=1.0):
        fan_in = shape[-1] if len(shape) > 1 else 1
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale / math.sqrt(fan_in)).to(dtype)

    sd = {
        "x_embedder.proj.weight": w(d, C * P * P).reshape(d, C, P, P),
        "x_embedder.proj.bias": w(d, scale=0.1),
        "t_embedder.mlp.0.weight": w(d, FREQ, scale=3.0),
        "t_embedder.mlp.0.bias": w(d, scale=0.1),
        "t_embedder.mlp.2.weight": w(d, d),
        "t_embedder.mlp.2.bias": w(d, scale=0.1),
        "y_embedder.embedding_table.weight": w(classes + 1, 1, scale=0.5).expand(-1, d).clone()
        + w(classes + 1, d, scale=0.5),
        # Stored rounded to float32, as the real (float32) files are.
        "pos_embed": ref_pos_embed(d, GRID).float().to(dtype)[None],
    }
    for i in range(depth):
        b = f"blocks.{i}."
        for name, rows, cols, scale in (
            ("attn.qkv", 3 * d, d, 1.0),
            ("attn.proj", d, d, 1.0),
            ("mlp.fc1", 4 * d, d, 1.0),
            ("mlp.fc2", d, 4 * d, 1.0),
            ("adaLN_modulation.1", 6 * d, d, 0.5),
        ):
            sd[b + name + ".weight"] = w(rows, cols, scale=scale)
            sd[b + name + ".bias"] = w(rows, scale=0.2)
    sd["final_layer.adaLN_modulation.1.weight"] = w(2 * d, d, scale=0.5)
    sd["final_layer.adaLN_modulation.1.bias"] = w(2 * d, scale=0.2)
    sd["final_layer.linear.weight"] = w(P * P * cout, d)
    sd["final_layer.linear.bias"] = w(P * P * cout, scale=0.2)
    if projectors:
        sd.update(
            {
                "projectors.0.0.weight": w(16, d),
                "projectors.0.0.bias": w(16),
                "projectors.0.2.weight": w(16, 16),
                "projectors.0.2.bias": w(16),
                "projectors.0.4.weight": w(8, 16),
                "projectors.0.4.bias": w(8),
            }
        )
    return sd


def save(obj, tmp_path, name="ckpt.pt", zip_format=True):
    path = tmp_path / name
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return str(path)


def inputs(seed=1, batch=3):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, C, SIDE, SIDE, generator=gen, dtype=F64)
    y = torch.tensor([0, CLASSES - 1, CLASSES])[:batch]  # the last one is the null class
    return z, y


TIMES = [0.0, 0.003, 0.2, 0.5, 0.77, 0.999, 1.0]


def as_t(value, batch=3):
    return torch.full((batch,), value, dtype=F64)


def assert_one_line(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


# ------------------------------------------------------------------------------------------------
# Layout facts, checked against the reference.


def test_position_layouts_differ_by_swapping_halves():
    official = ref_pos_embed(D, GRID)
    assert torch.allclose(official_pos_embed(D, GRID), official, atol=1e-12)
    ours = sincos_pos_embed_2d(D, GRID, GRID).double()
    assert not torch.allclose(ours, official, atol=1e-3)  # row first vs column first
    assert torch.allclose(ours, official[:, residual_permutation(D)], atol=1e-6)
    # Token i·g + j of onestep's table encodes row i in its first half.
    assert torch.allclose(ours[1 * GRID + 3, : D // 2], official[3 * GRID + 1, : D // 2], atol=1e-6)


def test_time_and_label_embeddings_match_official():
    t = torch.tensor([0.0, 0.3, 17.25, 999.0], dtype=F64)
    assert torch.allclose(timestep_features(t, FREQ), ref_timestep(t), atol=1e-12)  # cos first, 10000
    embedder = TimestepEmbedder(8, FREQ).double()
    sd = {f"t_embedder.mlp.{k}": v for k, v in embedder.mlp.state_dict().items()}
    lin = lambda h, n: F.linear(h, sd[f"t_embedder.mlp.{n}.weight"], sd[f"t_embedder.mlp.{n}.bias"])  # noqa: E731
    assert torch.allclose(embedder(t), lin(F.silu(lin(ref_timestep(t), 0)), 2), atol=1e-12)
    emb = LabelEmbedder(CLASSES, 8)
    rows = emb(None, 2, torch.device("cpu"))
    assert torch.equal(rows, emb.embedding_table.weight[[CLASSES, CLASSES]])  # null row = index num_classes


def test_time_flip_matrix_maps_features_of_t_to_features_of_one_minus_t():
    t = torch.rand(11, dtype=F64)
    assert torch.allclose(
        timestep_features(t, FREQ) @ time_flip_matrix(FREQ).T, timestep_features(1 - t, FREQ), atol=1e-12
    )


def test_residual_permutation_is_absorbed_exactly():
    torch.manual_seed(0)
    net = BACKBONES.build("test_dit", num_classes=CLASSES).double()
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0, 0.1)
    perm = torch.randperm(net.hidden_size)
    other = BACKBONES.build("test_dit", num_classes=CLASSES).double()
    other.load_state_dict(permute_residual(net.state_dict(), perm))
    other.pos_embed = net.pos_embed[..., perm]
    z, y = inputs()
    t, h = torch.rand(3, dtype=F64), torch.rand(3, dtype=F64)
    out, (feat,) = net.forward_features(z, t, h, y, blocks=[0])
    out2, (feat2,) = other.forward_features(z, t, h, y, blocks=[0])
    assert torch.allclose(out2, out, atol=1e-12, rtol=1e-12)
    assert torch.allclose(feat2, feat[..., perm], atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Loading and conversion.


@pytest.mark.parametrize("wrapper", ["raw", "ema", "model", "legacy_serialization"])
def test_sit_teacher_is_minus_reference_at_one_minus_t(tmp_path, wrapper):
    sd = make_state()
    decoy = make_state(seed=9)
    obj = {
        "raw": sd,
        "ema": {"model": decoy, "ema": sd, "opt": {"step": 3}, "args": argparse.Namespace(lr=1e-4)},
        "model": {"model": sd},
        "legacy_serialization": sd,
    }[wrapper]
    path = save(obj, tmp_path, zip_format=wrapper != "legacy_serialization")  # the old format is not memory-mapped
    teacher = load_teacher(f"sit:{path}#heads={HEADS}")
    assert isinstance(teacher, DiT) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.num_classes == CLASSES and teacher.input_shape == (C, SIDE, SIDE)
    assert teacher.x_embedder.weight.dtype == F64  # the file's dtype
    z, y = inputs()
    with torch.no_grad():
        for value in TIMES:
            t = as_t(value)
            expected = -ref_forward(sd, z, 1 - t, y)[:, :C]
            assert torch.allclose(teacher(z, t, None, y), expected, atol=1e-10, rtol=1e-10), value
            assert torch.allclose(teacher(z, t, torch.rand(3, dtype=F64), y), expected, atol=1e-10, rtol=1e-10)


def test_sit_fold_equals_unfolded_wrapper(tmp_path):
    path = save(make_state(cout=C), tmp_path)  # also: a SiT without learned Σ
    folded = load_teacher(f"sit:{path}", num_heads=HEADS)
    unfolded = load_teacher(f"sit:{path}", num_heads=HEADS, fold=False)
    assert isinstance(unfolded, SiTTeacher) and not any(p.requires_grad for p in unfolded.parameters())
    z, y = inputs(seed=2)
    out, (tokens,) = unfolded.forward_features(z, as_t(0.3), None, y, blocks=[0])
    assert torch.equal(out, unfolded(z, as_t(0.3), None, y)) and tokens.shape == (3, GRID * GRID, D)
    with torch.no_grad():
        for value in TIMES:
            t = as_t(value)
            assert torch.allclose(folded(z, t, None, y), unfolded(z, t, None, y), atol=1e-10, rtol=1e-10)
    # Float32 as stored in the real files: the fold holds to float tolerance.
    path32 = save(make_state(dtype=torch.float32), tmp_path, "f32.pt")
    folded32 = load_teacher(f"sit:{path32}#heads={HEADS}")
    unfolded32 = load_teacher(f"sit:{path32}#heads={HEADS}", fold=False)
    assert folded32.x_embedder.weight.dtype == torch.float32
    z32 = z.float()
    with torch.no_grad():
        for value in TIMES:
            t = torch.full((3,), value)
            assert torch.allclose(folded32(z32, t, None, y), unfolded32(z32, t, None, y), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("legacy", [False, True])
def test_repa_teacher_is_identity_and_ignores_projectors(tmp_path, legacy):
    sd = make_state(depth=3, cout=C, projectors=True)
    stored = dict(sd)
    if legacy:  # encoder blocks 0..1 keep their names, block 2 was "decoder_blocks.0"
        stored = {k.replace("blocks.2.", "decoder_blocks.0."): v for k, v in sd.items()}
        assert any(k.startswith("decoder_blocks.0.") for k in stored)
    path = save({"ema": stored, "args": argparse.Namespace(encoder_depth=2)}, tmp_path)
    teacher = load_teacher(f"repa_sit:{path}", num_heads=HEADS)
    assert teacher.num_blocks == 3
    z, y = inputs(seed=3)
    with torch.no_grad():
        for value in TIMES:
            t = as_t(value)
            assert torch.allclose(teacher(z, t, None, y), ref_forward(sd, z, t, y), atol=1e-10, rtol=1e-10)


def test_dit_network_is_converted_exactly(tmp_path):
    sd = make_state()
    teacher = load_teacher(f"dit:{save(sd, tmp_path)}#heads={HEADS}")
    assert isinstance(teacher, VPEpsilonTeacher)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert teacher.num_classes == CLASSES and teacher.input_shape == (C, SIDE, SIDE)
    z, y = inputs(seed=4)
    with torch.no_grad():
        for k in (0.0, 37.25, 258.1, 999.0):  # the ε-network at DDPM indices (channels 0..C-1)
            kk = as_t(k)
            assert torch.allclose(teacher.net(z, kk, None, y), ref_forward(sd, z, kk, y)[:, :C], atol=1e-10, rtol=1e-10)
        for value in (0.05, 0.3, 0.5, 0.8, 0.99):  # the velocity inside the table's range
            t = as_t(value)
            scale = torch.sqrt((1 - t) ** 2 + t**2)[:, None, None, None]
            eps = ref_forward(sd, z / scale, teacher.index(t), y)[:, :C]
            expected = (eps - z) / (1 - value)
            assert torch.allclose(teacher(z, t, None, y), expected, atol=1e-9, rtol=1e-9), value


def test_build_uses_the_same_position_buffer_as_a_fresh_dit(tmp_path):
    teacher = load_teacher(f"repa_sit:{save(make_state(cout=C), tmp_path)}#heads={HEADS}")
    fresh = DiT((C, SIDE, SIDE), CLASSES, patch_size=P, depth=DEPTH, hidden_size=D, num_heads=HEADS).double()
    assert torch.equal(teacher.pos_embed, fresh.pos_embed)
    assert not any(t.is_meta for t in list(teacher.parameters()) + list(teacher.buffers()))


# ------------------------------------------------------------------------------------------------
# DiT's VP schedule as a velocity.


class GaussianEps(nn.Module):
    """The exact ε-prediction E[ε | x_k] for x ~ N(μ, s²I) at the VP point of fractional index k."""

    num_classes = 0

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s
        self.input_shape = tuple(mu.shape)
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        self.lam = torch.log(alpha_bar / (1 - alpha_bar))

    def forward(self, x, k, h=None, y=None):
        k = k.double()
        lo = k.floor().clamp(0, 998).long()
        frac = k - lo
        lam = self.lam[lo] * (1 - frac) + self.lam[lo + 1] * frac  # λ linear in k between integers
        a = torch.sigmoid(lam).sqrt()[:, None]
        b = torch.sigmoid(-lam).sqrt()[:, None]
        return b / (a**2 * self.s**2 + b**2) * (x - a * self.mu)


def gaussian_setup(seed=5):
    gen = torch.Generator().manual_seed(seed)
    mu, s = torch.randn(6, generator=gen, dtype=F64), 0.7
    z = torch.randn(4, 6, generator=gen, dtype=F64) * 1.2
    return VPEpsilonTeacher(GaussianEps(mu, s)), GaussianClosedForm(mu, s), z


def test_ddpm_index_values():
    table = ddpm_log_snr()
    k = lambda v: ddpm_index(torch.tensor([v], dtype=F64), table).item()  # noqa: E731
    assert k(0.5) == pytest.approx(258.093, abs=1e-3)
    assert k(0.255) == pytest.approx(100.0, abs=0.01)
    assert T_MIN == pytest.approx(0.0099015, abs=1e-6) and T_MAX == pytest.approx(0.9936872, abs=1e-6)
    assert k(T_MIN) == pytest.approx(0.0, abs=1e-6) and k(T_MAX) == pytest.approx(999.0, abs=1e-6)
    assert k(0.0) == 0.0 and k(1e-4) == 0.0 and k(1.0) == 999.0 and k(0.9999) == 999.0
    assert k(0.2) < k(0.3) < k(0.9)


def test_dit_velocity_equals_gaussian_marginal_velocity_inside_the_table():
    teacher, exact, z = gaussian_setup()
    for value in torch.linspace(T_MIN + 1e-9, T_MAX - 1e-9, 13).tolist() + [0.5, 0.255]:
        t = torch.full((4,), value, dtype=F64)
        assert torch.allclose(teacher(z, t), exact.marginal_velocity(z, t), atol=1e-9, rtol=1e-9), value


def test_dit_velocity_is_finite_and_continuous_on_all_of_zero_one():
    teacher, exact, z = gaussian_setup()

    def v(value):
        return teacher(z, torch.full((4,), value, dtype=F64))

    for point in (0.0, T_MIN, 0.5, T_MAX, 1.0):
        for side in (-1e-10, 1e-10):
            if 0.0 <= point + side <= 1.0:
                assert torch.allclose(v(point + side), v(point), atol=1e-6), point
    # Outside the table the index is clamped: close to, not equal to, the exact velocity. For
    # N(μ, s²I) the error is ≈ sqrt(1 − ᾱ_0)·|z − μ|/s² at t = 0 and ≈ sqrt(ᾱ_999)·s²·|z| at t = 1.
    mu, s = exact.mu, exact.s
    bounds = {0.0: 0.01 * (z - mu).abs().max() / s**2, 1.0: 0.0064 * s**2 * z.abs().max()}
    for value in (0.0, 1e-12, 1.0, 1 - 1e-12):
        assert torch.isfinite(v(value)).all()
        error = (v(value) - exact.marginal_velocity(z, torch.full((4,), value, dtype=F64))).abs().max()
        assert 0 < error < 1.2 * bounds[round(value)], (value, error)


def test_dit_teacher_from_a_file_is_finite_at_the_ends_and_guides_all_channels(tmp_path):
    teacher = load_teacher(f"dit:{save(make_state(), tmp_path)}", num_heads=HEADS)
    z, y = inputs(seed=6)
    with torch.no_grad():
        for value in (0.0, 1e-9, T_MIN, 0.5, T_MAX, 1 - 1e-9, 1.0):
            assert torch.isfinite(teacher(z, as_t(value), None, y)).all()
        assert torch.allclose(teacher(z, as_t(0.0), None, y), teacher(z, as_t(1e-9), None, y), atol=1e-6)
        assert torch.allclose(teacher(z, as_t(1.0), None, y), teacher(z, as_t(1 - 1e-9), None, y), atol=1e-5)
        v, (tokens,) = teacher.forward_features(z, as_t(0.3), None, y, blocks=[-1])
        assert torch.equal(v, teacher(z, as_t(0.3), None, y)) and tokens.shape == (3, GRID * GRID, D)
        cast = load_teacher(f"dit:{save(make_state(), tmp_path, 'b.pt')}", num_heads=HEADS).float()
        assert cast.log_snr_table.dtype == F64  # the schedule stays float64 when the module is cast
        assert torch.allclose(
            cast(z.float(), as_t(0.3).float(), None, y).double(), teacher(z, as_t(0.3), None, y), atol=1e-4, rtol=1e-4
        )
        w = 2.5
        for value in (0.2, 0.7):
            t = as_t(value)
            guided = velocity(teacher, z, t, y, guidance_scale=w)
            scale = math.sqrt((1 - value) ** 2 + value**2)
            k = teacher.index(t)
            eps_c = teacher.net(z / scale, k, None, y)
            eps_u = teacher.net(z / scale, k, None, torch.full_like(y, CLASSES))
            eps = eps_u + w * (eps_c - eps_u)  # all four channels
            assert torch.allclose(guided, (eps - z) / (1 - value), atol=1e-9, rtol=1e-9)


def test_sit_teacher_works_with_project_guidance(tmp_path):
    sd = make_state()
    teacher = load_teacher(f"sit:{save(sd, tmp_path)}#heads={HEADS}")
    z, y = inputs(seed=7)
    t = as_t(0.4)
    null = torch.full_like(y, CLASSES)
    cond, uncond = -ref_forward(sd, z, 1 - t, y)[:, :C], -ref_forward(sd, z, 1 - t, null)[:, :C]
    assert torch.allclose(velocity(teacher, z, t, y, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# Initialisation.


def test_init_state_equals_teacher_at_h_zero(tmp_path):
    for fmt, sd in (("sit", make_state()), ("repa_sit", make_state(cout=C, projectors=True))):
        spec = f"{fmt}:{save(sd, tmp_path, fmt + '.pt')}#heads={HEADS}"
        student = BACKBONES.build("test_dit", num_classes=CLASSES).double()
        student.load_state_dict(init_state(spec, student))
        teacher = load_teacher(spec)
        z, y = inputs(seed=8)
        with torch.no_grad():
            for value in TIMES:
                t = as_t(value)
                assert torch.allclose(
                    student(z, t, torch.zeros_like(t), y), teacher(z, t, None, y), atol=1e-10, rtol=1e-10
                )
        # The interval embedder starts at zero output but is trainable (its first layer is not zero).
        assert student.h_embedder.mlp[2].weight.abs().max() == 0 and student.h_embedder.mlp[0].weight.abs().max() > 0


def test_init_state_takes_heads_from_the_backbone_for_non_standard_widths(tmp_path):
    path = save(make_state(cout=C), tmp_path)
    student = BACKBONES.build("test_dit", num_classes=CLASSES)
    assert init_state(f"repa_sit:{path}", student)["x_embedder.weight"].dtype == torch.float32
    with pytest.raises(ConfigError) as info:
        init_state(f"repa_sit:{path}#heads=4", student)
    assert_one_line(info, "4 heads", "backbone 2")


def test_init_state_refusals(tmp_path):
    path = save(make_state(), tmp_path)
    student = BACKBONES.build("test_dit", num_classes=CLASSES)
    with pytest.raises(ConfigError) as info:
        init_state(f"dit:{path}#heads={HEADS}", student)
    assert_one_line(info, "not a velocity network")
    wide = DiT((C, SIDE, SIDE), CLASSES, patch_size=P, depth=DEPTH, hidden_size=64, num_heads=HEADS)
    with pytest.raises(ConfigError) as info:
        init_state(f"sit:{path}#heads={HEADS}", wide)
    assert_one_line(info, "'x_embedder.weight'", "[32, 4, 2, 2]", "[64, 4, 2, 2]")
    deep = DiT((C, SIDE, SIDE), CLASSES, patch_size=P, depth=DEPTH + 1, hidden_size=D, num_heads=HEADS)
    with pytest.raises(ConfigError) as info:
        init_state(f"sit:{path}#heads={HEADS}", deep)
    assert_one_line(info, "blocks.2.")
    classes = BACKBONES.build("test_dit", num_classes=10)
    with pytest.raises(ConfigError) as info:
        init_state(f"sit:{path}#heads={HEADS}", classes)
    assert_one_line(info, "'y_embedder.embedding_table.weight'", "[6, 32]", "[11, 32]")
    scaled = BACKBONES.build("test_dit", num_classes=CLASSES, time_scale=1000.0)
    with pytest.raises(ConfigError) as info:
        init_state(f"sit:{path}#heads={HEADS}", scaled)
    assert_one_line(info, "time_scale")
    larger = DiT((C, 2 * SIDE, 2 * SIDE), CLASSES, patch_size=P, depth=DEPTH, hidden_size=D, num_heads=HEADS)
    with pytest.raises(ConfigError) as info:
        init_state(f"sit:{path}#heads={HEADS}", larger)
    assert_one_line(info, "input shape")


# ------------------------------------------------------------------------------------------------
# Specs, heads, registry.


def test_parse_spec():
    spec = parse_spec("sit:/ckpt/SiT-XL-2-256x256.pt")
    assert spec == ("sit", "/ckpt/SiT-XL-2-256x256.pt") and spec.options == {}
    fmt, path = parse_spec("repa_sit:runs/a#b/last.pt#heads=16")
    assert (fmt, path) == ("repa_sit", "runs/a#b/last.pt")
    assert parse_spec("dit:w.pt#heads=16").options == {"heads": 16}
    assert parse_spec("dit:my#file.pt").path == "my#file.pt"
    for not_a_spec in ("C:\\ckpt\\a.pt", "c:/ckpt/a.pt", "/ckpt/a.pt", "runs/last.pt", "https://x.org/a.pt", None):
        assert parse_spec(not_a_spec) is None
    with pytest.raises(ConfigError) as info:
        parse_spec("sitt:/a.pt")
    assert_one_line(info, "'sitt'", "dit, onestep, repa_sit, sit")
    with pytest.raises(ConfigError) as info:
        parse_spec("sit:/a.pt#depth=3")
    assert_one_line(info, "unknown option 'depth'", "heads")
    with pytest.raises(ConfigError) as info:
        parse_spec("sit:/a.pt#heads=0")
    assert_one_line(info, "heads")
    with pytest.raises(ConfigError) as info:  # a plain path is the onestep format (a run, checkpoint or export)
        load_teacher("/ckpt/a.pt")
    assert_one_line(info, "/ckpt/a.pt", "not found")


def test_head_count_inference_and_override():
    def shapes(d):
        meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
        sd = {
            "x_embedder.proj.weight": meta(d, 4, 2, 2),
            "pos_embed": meta(1, 256, d),
            "blocks.0.attn.qkv.weight": meta(3 * d, d),
            "y_embedder.embedding_table.weight": meta(1001, d),
            "t_embedder.mlp.0.weight": meta(d, 256),
            "blocks.0.mlp.fc1.weight": meta(4 * d, d),
            "final_layer.linear.weight": meta(32, d),
        }
        return sd

    for width, heads in STANDARD_HEADS.items():
        arch = infer_arch(shapes(width), "x")
        assert (arch.num_heads, arch.hidden_size, arch.grid_size, arch.num_classes) == (heads, width, 16, 1000)
        assert arch.learn_sigma and arch.input_shape == (4, 32, 32)
    assert infer_arch(shapes(1152), "x", num_heads=8).num_heads == 8
    with pytest.raises(ConfigError) as info:
        infer_arch(shapes(512), "x")
    assert_one_line(info, "width 512", "heads=")
    assert infer_arch(shapes(512), "x", num_heads=8).num_heads == 8
    with pytest.raises(ConfigError) as info:
        infer_arch(shapes(512), "x", num_heads=7)
    assert_one_line(info, "7 heads")


def test_heads_from_spec_and_argument(tmp_path):
    path = save(make_state(cout=C), tmp_path)
    with pytest.raises(ConfigError) as info:
        load_teacher(f"repa_sit:{path}")
    assert_one_line(info, "width 32", "#heads=N")
    assert load_teacher(f"repa_sit:{path}", num_heads=HEADS).blocks[0].attn.num_heads == HEADS
    assert load_teacher(f"repa_sit:{path}#heads=4").blocks[0].attn.num_heads == 4
    with pytest.raises(ConfigError) as info:
        load_teacher(f"repa_sit:{path}#heads=4", num_heads=2)
    assert_one_line(info, "heads=4", "num_heads=2")


def test_registry_and_descriptions():
    assert REGISTRIES["formats"] is FORMATS
    assert FORMATS.names() == ["dit", "onestep", "repa_sit", "sit"]
    for name in FORMATS.names():
        assert get_format(name).name == name and len(describe(name)) > 40


# ------------------------------------------------------------------------------------------------
# Wrong files.


def test_wrong_files_give_one_line_naming_key_and_shape(tmp_path):
    sd = make_state()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ConfigError) as info:
        load_teacher(f"sit:{save(missing, tmp_path, 'm.pt')}#heads={HEADS}")
    assert_one_line(info, "missing key 'blocks.1.mlp.fc2.bias'", "[32]")
    shaped = dict(sd, **{"blocks.0.attn.proj.weight": torch.zeros(32, 16, dtype=F64)})
    with pytest.raises(ConfigError) as info:
        load_teacher(f"sit:{save(shaped, tmp_path, 's.pt')}#heads={HEADS}")
    assert_one_line(info, "'blocks.0.attn.proj.weight'", "[32, 16]", "expected [32, 32]")
    no_pos = {k: v for k, v in sd.items() if k != "pos_embed"}
    with pytest.raises(ConfigError) as info:
        load_teacher(f"dit:{save(no_pos, tmp_path, 'p.pt')}#heads={HEADS}")
    assert_one_line(info, "missing key 'pos_embed'")
    swapped = dict(sd, pos_embed=sincos_pos_embed_2d(D, GRID, GRID).double()[None])  # onestep's layout
    with pytest.raises(ConfigError) as info:
        load_teacher(f"sit:{save(swapped, tmp_path, 'q.pt')}#heads={HEADS}")
    assert_one_line(info, "pos_embed", "sin-cos")


def test_wrong_format_named(tmp_path):
    repa = save(make_state(cout=C, projectors=True), tmp_path, "repa.pt")
    with pytest.raises(ConfigError) as info:
        load_teacher(f"sit:{repa}#heads={HEADS}")
    assert_one_line(info, "unexpected key 'projectors.0.0.weight'", "[16, 32]", "repa_sit")
    sit = save(make_state(), tmp_path, "sit.pt")
    with pytest.raises(ConfigError) as info:
        load_teacher(f"repa_sit:{sit}#heads={HEADS}")
    assert_one_line(info, "'final_layer.linear.weight'", "[32, 32]", "expected [16, 32]")


def test_non_checkpoints_are_refused(tmp_path):
    for obj, needle in (
        ({"step": 3, "note": "x"}, "not a state dict"),
        ({"format": "onestep-checkpoint/1", "step": 1}, "onestep run checkpoint"),
        ([torch.zeros(2)], "not a state dict"),
    ):
        with pytest.raises(ConfigError) as info:
            load_teacher(f"sit:{save(obj, tmp_path)}#heads={HEADS}")
        assert_one_line(info, needle)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ConfigError) as info:
        load_teacher(f"sit:{junk}")
    assert_one_line(info, "not a readable torch checkpoint")
    with pytest.raises(ConfigError) as info:
        load_teacher(f"sit:{tmp_path / 'absent.pt'}")
    assert_one_line(info, "no such file")


class _RunsCode:
    """Unpickling this calls exec: a file must never be able to do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "side_effect.txt"
    sd = dict(make_state(), payload=_RunsCode(str(marker)))
    path = save({"ema": sd}, tmp_path)
    with pytest.raises(ConfigError) as info:
        load_teacher(f"sit:{path}#heads={HEADS}")
    assert_one_line(info, "refused", "exec")
    assert not marker.exists()
