"""Decoupled MeanFlow: the decoupled DiT (h = 0 is the plain network, bitwise), its JVP, the
conversion of a flow-matching run, the samplers, and the loss against an independent transcription
of the authors' DMFLoss (kyungmnlee/dmf loss.py, as specified in docs/dmf.md) in float64."""

from __future__ import annotations

import math

import pytest
import torch

from onestep.backbones.dit import DiT
from onestep.objectives.dmf import DecoupledMeanFlow, LogVarianceHead, dmf_times, log_variance_loss
from onestep.objectives.flow_map import shifted_grid
from onestep.sampling import sample

SHAPE, CLASSES = (2, 4, 4), 3


def _net(decoupled=2, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = DiT(SHAPE, CLASSES, patch_size=2, depth=3, hidden_size=16, num_heads=2, decoupled_depth=decoupled)
    with torch.no_grad():
        for p in net.parameters():  # adaLN-Zero starts at zero: randomise everything
            p.copy_(0.3 * torch.randn_like(p))
    return net.to(dtype).eval()


def _inputs(n=5, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g, dtype=dtype)
    t = torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.05
    h = torch.rand(n, generator=g, dtype=dtype) * t
    y = torch.randint(0, CLASSES + 1, (n,), generator=g)
    return x, t, h, y


def test_decoupled_dit_at_h0_is_the_plain_network_bitwise():
    plain, decoupled = _net(None), _net(2)
    decoupled.load_state_dict(plain.state_dict())
    x, t, h, y = _inputs()
    zero = torch.zeros_like(t)
    assert torch.equal(plain(x, t, zero, y), decoupled(x, t, zero, y))
    assert torch.equal(plain(x, t, None, y), decoupled(x, t, None, y))
    # h > 0: the decoupled net differs from the plain one, and is the plain blocks run with c(t) on
    # blocks [0, 2) and c(t - h) on block 2 and the final layer.
    out = decoupled(x, t, h, y)
    assert not torch.allclose(out, plain(x, t, h, y))
    c_t, c_r = plain.condition(t, None, y, 5, x.device), plain.condition(t - h, None, y, 5, x.device)
    tokens = plain.x_embedder(x).flatten(2).transpose(1, 2) + plain.pos_embed.to(x.dtype)
    for i, block in enumerate(plain.blocks):
        tokens = block(tokens, c_t if i < 2 else c_r)
    torch.testing.assert_close(out, plain.unpatchify(plain.final_layer(tokens, c_r)), rtol=0, atol=1e-12)
    # All blocks on t (K = depth) only moves the final layer; "auto" is 2/3 of the depth.
    assert _net(3).decoupled_depth == 3 and _net("auto").decoupled_depth == 2
    with pytest.raises(ValueError, match="decoupled_depth"):
        _net(4)


def test_decoupled_jvp_holds_r_fixed():
    """The JVP along (v, 1, 1) in (z, t, h) is d/dε u(z + εv, t + ε, h + ε): r = t − h stays put, so
    only the encoder blocks see the time move (finite differences)."""
    from onestep.objectives.meanflow import meanflow_jvp

    net = _net(2)
    x, t, h, y = _inputs()
    v = torch.randn_like(x)
    u, dudt, _ = meanflow_jvp(net, x, t, h, v, y)
    eps = 1e-6
    with torch.no_grad():
        fd = (net(x + eps * v, t + eps, h + eps, y) - net(x - eps * v, t - eps, h - eps, y)) / (2 * eps)
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(u, net(x, t, h, y))


def test_flow_map_samplers():
    net = _net(2)
    obj = DecoupledMeanFlow(sampler="euler")
    noise, y = _inputs(4)[0], torch.tensor([0, 1, 2, 3])
    # 1 NFE: x = e − u(e, 1, 1); 2 NFE: 1 -> 0.5 -> 0 with h = 0.5 twice.
    one = sample(obj, net, noise, y, nfe=1)
    with torch.no_grad():
        ones = torch.ones(4, dtype=noise.dtype)
        assert torch.allclose(one, noise - net(noise, ones, ones, y))
        two = sample(obj, net, noise, y, nfe=2)
        mid = noise - 0.5 * net(noise, ones, 0.5 * ones, y)
        assert torch.allclose(two, mid - 0.5 * net(mid, 0.5 * ones, 0.5 * ones, y))
    # Restart: jump to the data, re-noise with the given noise.
    restart = DecoupledMeanFlow(sampler="restart")
    assert restart.stochastic_sampling and not obj.stochastic_sampling
    fresh = torch.randn_like(noise)
    with torch.no_grad():
        x_hat = noise - net(noise, ones, ones, y)
        step = restart.sample_step(net, noise, ones, 0.5 * ones, y, noise=fresh)
        assert torch.allclose(step, 0.5 * x_hat + 0.5 * fresh)
        z = 0.5 * x_hat + 0.5 * fresh
        last = restart.sample_step(net, z, 0.5 * ones, 0 * ones, y)
        assert torch.allclose(last, z - 0.5 * net(z, 0.5 * ones, 0.5 * ones, y))
    # Shifted grid: s·t / (1 + (s − 1)·t).
    grid = shifted_grid(2, 1.5)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75 / 1.25, 0.0]))
    assert torch.equal(shifted_grid(4, 1.0), torch.linspace(1, 0, 5))


# ----------------------------------------------------------------------------------- the harness
def authors_dmf_loss(model, x, y, *, tau, e_fm, t, r, e_mf, drop, omega, g_min, g_max, null, c=0.01):
    """An independent transcription of DMFLoss.__call__ (docs/dmf.md, "The loss"): the authors'
    interface model(x, t, r, y, return_logvar) with absolute t and r, JVP primals (x, t, r) and
    tangents (v, 1, 0), u_tgt = v + (r − t)·du_dt, log_lv_loss = log(e / exp(lv) + 0.01) + lv."""
    y = torch.where(drop, torch.full_like(y, null), y)

    def col(a):
        return a.view(-1, 1, 1, 1)

    def guidance(z, tt, v):
        with torch.no_grad():
            gap = model(z, tt, tt, y) - model(z, tt, tt, torch.full_like(y, null))
        on = (~drop) & (tt >= g_min) & (tt <= g_max)
        return torch.where(col(on), v + omega * gap, v)

    def log_lv_loss(err, lv):
        return torch.log(err / torch.exp(lv) + c) + lv

    z_f = (1 - col(tau)) * x + col(tau) * e_fm
    v_f = guidance(z_f, tau, e_fm - x)
    u_f, lv_f = model(z_f, tau, tau, y, return_logvar=True)
    loss_fm = log_lv_loss(((u_f - v_f.detach()) ** 2).mean(dim=(1, 2, 3)), lv_f)
    z_m = (1 - col(t)) * x + col(t) * e_mf
    v_m = guidance(z_m, t, e_mf - x)
    from onestep.backbones.attention import jvp_attention

    with jvp_attention("explicit"):  # the plain softmax attention (the authors' attn_func="base")
        u_m, du_dt = torch.func.jvp(
            lambda xx, tt, rr: model(xx, tt, rr, y), (z_m, t, r), (v_m, torch.ones_like(t), torch.zeros_like(r))
        )
    u_tgt = (v_m + col(r - t) * du_dt).detach()
    _, lv_m = model(z_m, t, r, y, return_logvar=True)
    loss_mf = log_lv_loss(((u_m - u_tgt) ** 2).mean(dim=(1, 2, 3)), lv_m)
    return 0.5 * (loss_fm + loss_mf)


def test_loss_equals_the_authors_on_identical_inputs():
    torch.manual_seed(0)
    net = _net(2)
    obj = DecoupledMeanFlow(omega=0.6, guidance_interval=[0.0, 0.7], jvp_kernel="explicit")
    obj.trainable = obj.trainable.double()
    with torch.no_grad():
        obj.trainable.linear.weight.normal_(0, 0.1)  # a trained head, not the zero start
        obj.trainable.linear.bias.fill_(-0.3)
    n = 6
    x = torch.randn(n, *SHAPE, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    drop = torch.tensor([False, True, False, False, False, True])
    tau, t, r = (a.double() for a in dmf_times(n, mean_fm=0, std_fm=1, mean_t=0.4, std_t=1, mean_r=-1.2, std_r=1))
    tau[0], t[2] = 0.9, 0.95  # some samples outside the guidance interval
    e_fm, e_mf = torch.randn_like(x), torch.randn_like(x)

    def model(z, tt, rr, yy, return_logvar=False):
        out = net(z, tt, tt - rr, yy)
        return (out, obj.logvar(tt, rr)) if return_logvar else out

    ours = obj.loss_given(net, x, torch.where(drop, CLASSES, y), tau=tau, e_fm=e_fm, t=t, r=r, e_mf=e_mf).loss
    theirs = authors_dmf_loss(
        model, x, y, tau=tau, e_fm=e_fm, t=t, r=r, e_mf=e_mf, drop=drop, omega=0.6, g_min=0.0, g_max=0.7, null=CLASSES
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    # The same gradients, network and head.
    params = list(net.parameters()) + list(obj.trainable.parameters())
    g_ours = torch.autograd.grad(ours.mean(), params)
    g_theirs = torch.autograd.grad(theirs.mean(), params)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_log_variance_loss_and_head():
    e, lv = torch.tensor([0.5, 2.0]), torch.tensor([0.0, math.log(3.0)])
    torch.testing.assert_close(log_variance_loss(e, lv), torch.log(e + 0.01 * torch.exp(lv)))
    head = LogVarianceHead(8)
    assert torch.equal(head(torch.rand(3), torch.rand(3)), torch.zeros(3))  # zero at the start
    with pytest.raises(ValueError, match="logvar_features"):
        LogVarianceHead(7)


def test_guidance_options_refuse_bad_combinations():
    with pytest.raises(ValueError, match="needs objective.teacher"):
        DecoupledMeanFlow(guidance="teacher")
    with pytest.raises(ValueError, match="guidance"):
        DecoupledMeanFlow(guidance="cfg")
    with pytest.raises(ValueError, match="omega"):
        DecoupledMeanFlow(omega=1.0)


def test_eval_and_sample_take_the_restart_sampler(tiny_recipe, tmp_path, capsys):
    """`--sampler restart` on a flow map: its rows say so and compare keeps them apart from the Euler
    rows; samples differ from Euler's at 2 NFE and not at 1 (one jump either way); a flow-matching run
    refuses it in one line."""
    import json

    import numpy as np

    from onestep.cli import main

    run = tmp_path / "run"
    assert main(["train", str(tiny_recipe), "--run-dir", str(run), "--no-progress", "train.steps=4"]) == 0
    common = ["--nfe", "2", "--num-samples", "64", "--metrics", "energy_distance"]
    assert main(["eval", str(run), *common]) == 0
    assert main(["eval", str(run), *common, "--sampler", "restart"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["sampler"] for r in rows] == ["euler", "restart"] and rows[0]["value"] != rows[1]["value"]
    capsys.readouterr()
    assert main(["compare", str(run), "--format", "md"]) == 0
    table = capsys.readouterr().out
    assert "restart sampler" in table and "energy_distance@2 [a]" in table
    for nfe, same in (("1", True), ("2", False)):
        for sampler in ("euler", "restart"):
            out = tmp_path / f"{sampler}{nfe}.npz"
            assert main(["sample", str(run), "-n", "8", "--nfe", nfe, "--sampler", sampler, "--out", str(out)]) == 0
        a, b = (np.load(tmp_path / f"{s}{nfe}.npz")["arr_0"] for s in ("euler", "restart"))
        assert np.array_equal(a, b) == same, nfe
    fm = tmp_path / "fm"
    assert (
        main(
            [
                "train",
                str(tiny_recipe),
                "--run-dir",
                str(fm),
                "--no-progress",
                "train.steps=2",
                "objective.name=flow_matching",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(fm), *common, "--sampler", "restart"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--sampler" in err and "one sampler of its own" in err
