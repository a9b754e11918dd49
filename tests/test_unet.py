"""The DDPM++ U-Net backbones: shapes, gradients, features, JVP through attention, parameter count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onestep.backbones.attention import jvp_attention
from onestep.registry import BACKBONES

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions run faster on one thread


def tiny(**kw):
    return BACKBONES.build("test_unet", **kw)


@pytest.mark.parametrize("shape, num_classes", [((3, 8, 8), 0), ((1, 8, 8), 10), ((3, 16, 16), 4)])
def test_shapes_and_conditioning(shape, num_classes):
    torch.manual_seed(0)
    net = tiny(input_shape=shape, num_classes=num_classes)
    assert net.input_shape == shape and net.num_classes == num_classes
    for p in net.parameters():
        if not p.abs().sum():
            nn.init.normal_(p, std=0.1)
    x, t = torch.randn(4, *shape), torch.rand(4)
    y = torch.tensor([0, 1, 2, num_classes]) if num_classes else None
    out = net(x, t, t / 2, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, net(x, t, torch.zeros(4), y))  # h matters
    assert not torch.allclose(out, net(x, t.flip(0), t / 2, y))  # t matters
    if num_classes:
        assert torch.allclose(net(x, t, None, None), net(x, t, torch.zeros(4), torch.full((4,), num_classes)))
        assert not torch.allclose(out, net(x, t, t / 2, torch.tensor([3, 3, 3, 3])))
    with pytest.raises(ValueError, match="per-sample shape"):
        net(torch.randn(2, shape[0], 4, 4), torch.rand(2))


def test_output_starts_at_zero_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = tiny(input_shape=(3, 8, 8), num_classes=3, dropout=0.1)
    x, t, h, y = torch.randn(6, 3, 8, 8), torch.rand(6), torch.rand(6), torch.tensor([0, 1, 2, 3, 0, 1])
    assert net(x, t, h, y).abs().max() == 0  # zero-initialised output conv
    zero_init = [name for name, p in net.named_parameters() if p.dim() > 1 and not p.abs().sum()]
    assert (
        any("conv1" in n for n in zero_init) and any("proj" in n for n in zero_init) and "conv_out.weight" in zero_init
    )
    for p in net.parameters():  # perturb zero-init layers
        if not p.abs().sum():
            nn.init.normal_(p, std=0.05)
    out, feats = net.forward_features(x, t, h, y, blocks=net.encoder_blocks)
    (out.square().mean() + feats[0].mean()).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, missing


def test_forward_features_match_forward_and_block_layout():
    torch.manual_seed(0)
    net = tiny(input_shape=(3, 8, 8)).eval()
    for p in net.parameters():
        if not p.abs().sum():
            nn.init.normal_(p, std=0.05)
    # 1 res block, 2 levels: encoder [block 8x8, down, block 4x4], decoder [mid x2, 2 blocks, up, 2 blocks].
    assert net.num_blocks == 10 and net.encoder_blocks == (2,)
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    out, feats = net.forward_features(x, t, t, blocks=[0, 1, 2, -1, 5])
    assert torch.equal(out, net(x, t, t))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 8, 8), (16, 4, 4), (32, 4, 4), (16, 8, 8), (32, 4, 4)]
    with pytest.raises(ValueError, match="out of range"):
        net.forward_features(x, t, t, blocks=[10])


def test_jvp_through_attention_matches_finite_differences():
    torch.manual_seed(0)
    net = tiny(input_shape=(3, 8, 8), num_classes=2).double().eval()
    assert any(block.num_heads for block in list(net.enc) + list(net.dec))  # attention is exercised
    for p in net.parameters():
        if not p.abs().sum():
            nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t, h, y = (
        torch.tensor([0.3, 0.7], dtype=torch.float64),
        torch.tensor([0.1, 0.5], dtype=torch.float64),
        torch.tensor([0, 2]),
    )
    dx = torch.randn_like(x)
    ones = torch.ones_like(t)

    def fn(x_, t_, h_):
        return net(x_, t_, h_, y)

    with jvp_attention():
        out, tangent = torch.func.jvp(fn, (x, t, h), (dx, ones, ones))
    eps = 1e-7
    fd = (fn(x + eps * dx, t + eps, h + eps) - fn(x - eps * dx, t - eps, h - eps)) / (2 * eps)
    assert torch.allclose(out, net(x, t, h, y))
    # time_scale 1000 makes the t-derivatives large (|tangent| ~ 1e2): compare relative to their scale.
    err = ((tangent - fd).abs().max() / tangent.abs().max()).item()
    assert err < 1e-6, err
    # A wrong tangent (h held fixed) is far off, so the check has teeth.
    with jvp_attention():
        _, partial = torch.func.jvp(fn, (x, t, h), (dx, ones, torch.zeros_like(h)))
    assert ((partial - fd).abs().max() / tangent.abs().max()).item() > 1e-3


def test_unet_cifar_parameter_count():
    with torch.device("meta"):
        net = BACKBONES.build("unet_cifar", input_shape=(3, 32, 32))
    n = sum(p.numel() for p in net.parameters())
    assert 50_000_000 < n < 60_000_000, n
    # EDM DDPM++ layout: 4 res blocks per level + 2 down blocks, decoder 2 middle + 3 x 5 + 2 up blocks.
    assert net.num_blocks == 14 + 19 and net.encoder_blocks == (13,)
    attn = [i for i, block in enumerate(list(net.enc) + list(net.dec)) if block.num_heads]
    assert len(attn) == 4 + 1 + 1  # 16x16 encoder, middle, 16x16 decoder


def test_registered_with_generic_variant():
    net = BACKBONES.build(
        "unet",
        input_shape=(1, 8, 8),
        model_channels=8,
        channel_mult=[1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        num_classes=0,
    )
    assert net(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="divisible"):
        BACKBONES.build("unet", input_shape=(1, 6, 6), channel_mult=[1, 1, 1])
