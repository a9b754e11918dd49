"""Dispersive loss: each variant against its formula, its properties, gradients through the MeanFlow
JVP and the loop, and the all-gather over a 2-process gloo group."""

import json
import math
import warnings

import pytest
import torch

import onestep.regularizers.dispersive as disp
from onestep.registry import BACKBONES, OBJECTIVES, REGULARIZERS, ConfigError
from onestep.regularizers.dispersive import covariance, hinge, infonce_cosine, infonce_l2

torch.set_num_threads(1)
VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")


# ----------------------------------------------------------------------------------------------
# Slow, loop-based evaluations of the documented formulas (float64).


def slow_infonce_l2(z, tau):
    z = z.flatten(1).double()
    b, d = z.shape
    s = sum(math.exp(-float(((z[i] - z[j]) ** 2).sum()) / (tau * d)) for i in range(b) for j in range(b))
    return math.log(s / b**2)


def slow_infonce_cosine(z, tau):
    z = z.flatten(1).double()
    b = z.shape[0]
    cos = lambda a, c: float(a @ c / (a.norm() * c.norm()))  # noqa: E731
    s = sum(math.exp(cos(z[i], z[j]) / tau) for i in range(b) for j in range(b))
    return math.log(s / b**2)


def slow_hinge(z, margin):
    z = z.flatten(1).double()
    b, d = z.shape
    return sum(max(0.0, margin - float(((z[i] - z[j]) ** 2).sum()) / d) ** 2 for i in range(b) for j in range(b)) / b**2


def slow_covariance(z, eps=1e-5):
    z = z.flatten(1).double()
    b, d = z.shape
    mu = [float(z[:, m].mean()) for m in range(d)]
    sd = [math.sqrt(sum((float(z[i, m]) - mu[m]) ** 2 for i in range(b)) / (b - 1) + eps) for m in range(d)]
    zs = [[(float(z[i, m]) - mu[m]) / sd[m] for m in range(d)] for i in range(b)]
    total = 0.0
    for m in range(d):
        for n in range(d):
            if m != n:
                c = sum(zs[i][m] * zs[i][n] for i in range(b)) / (b - 1)
                total += c * c
    return total / (d * (d - 1))


SLOW = {
    "infonce_l2": lambda z: slow_infonce_l2(z, 0.7),
    "infonce_cosine": lambda z: slow_infonce_cosine(z, 0.7),
    "hinge": lambda z: slow_hinge(z, 1.5),
    "covariance": slow_covariance,
}
FAST = {
    "infonce_l2": lambda z: infonce_l2(z, tau=0.7),
    "infonce_cosine": lambda z: infonce_cosine(z, tau=0.7),
    "hinge": lambda z: hinge(z, margin=1.5),
    "covariance": covariance,
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(6, 3, 2), (5, 2), (4, 9)])  # D' < B, D' ≈ B, D' > B
def test_variant_matches_slow_formula(variant, shape):
    g = torch.Generator().manual_seed(sum(shape))
    z = torch.randn(shape, generator=g) * 0.8 + torch.randn(shape[1:], generator=g)
    fast = float(FAST[variant](z))
    assert fast == pytest.approx(SLOW[variant](z), rel=1e-4, abs=1e-5)


def test_registered_factory_dispatches_kwargs():
    z = torch.randn(7, 5)
    assert float(REGULARIZERS.build("dispersive")(z)) == pytest.approx(slow_infonce_l2(z, 0.5), rel=1e-5)
    reg = REGULARIZERS.build("dispersive", variant="infonce_cosine", tau=0.3)
    assert float(reg(z)) == pytest.approx(slow_infonce_cosine(z, 0.3), rel=1e-5)
    reg = REGULARIZERS.build("dispersive", variant="hinge", margin=3.0)
    assert float(reg(z)) == pytest.approx(slow_hinge(z, 3.0), rel=1e-5)
    assert float(REGULARIZERS.build("dispersive", variant="covariance")(z)) == pytest.approx(
        slow_covariance(z), rel=1e-4
    )
    with pytest.raises(ConfigError, match="variant' must be one of 'infonce_l2'"):
        REGULARIZERS.build("dispersive", variant="l2")
    with pytest.raises(ConfigError, match="tau must be > 0"):
        REGULARIZERS.build("dispersive", tau=0.0)


def test_infonce_l2_zero_floor_and_bounds():
    b = 8
    same = torch.randn(1, 4, 4).expand(b, 4, 4)
    assert float(infonce_l2(same)) == pytest.approx(0.0, abs=1e-6)
    far = torch.eye(b).repeat(1, 3) * 100.0  # every pair far apart
    assert float(infonce_l2(far)) == pytest.approx(-math.log(b), abs=1e-6)
    for seed in range(5):
        z = torch.randn(b, 6, generator=torch.Generator().manual_seed(seed)) * (seed + 0.1)
        value = float(infonce_l2(z, tau=0.5))
        assert -math.log(b) - 1e-6 <= value <= 1e-6
    # Other variants at identical features: documented constants.
    assert float(infonce_cosine(same, tau=0.5)) == pytest.approx(2.0, abs=1e-5)
    assert float(hinge(same, margin=1.0)) == pytest.approx(1.0, abs=1e-6)
    assert float(hinge(far, margin=1.0)) == pytest.approx(1.0 / b, abs=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_invariant_to_batch_order(variant):
    z = torch.randn(9, 2, 3)
    perm = torch.randperm(9)
    assert float(FAST[variant](z[perm])) == pytest.approx(float(FAST[variant](z)), rel=1e-5, abs=1e-6)


def _mean_pairwise_distance(z):
    return float(torch.pdist(z.flatten(1)).mean())


@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_cosine", "hinge"])
def test_gradient_step_pushes_features_apart(variant):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(1, 8, generator=g) + 0.1 * torch.randn(12, 8, generator=g)).requires_grad_(True)
    REGULARIZERS.build("dispersive", variant=variant)(z).backward()
    moved = z.detach() - 0.05 * z.grad
    if variant == "infonce_cosine":  # the cosine variant spreads directions
        unit = lambda a: torch.nn.functional.normalize(a, dim=1)  # noqa: E731
        assert _mean_pairwise_distance(unit(moved)) > _mean_pairwise_distance(unit(z.detach()))
    else:
        assert _mean_pairwise_distance(moved) > _mean_pairwise_distance(z.detach())


def test_covariance_step_decorrelates():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 1, generator=g)
    z = (base.repeat(1, 6) + 0.3 * torch.randn(16, 6, generator=g)).requires_grad_(True)
    before = covariance(z)
    before.backward()
    assert float(covariance(z.detach() - 0.5 * z.grad)) < before.item() - 1e-3


def test_single_sample_warns_once_and_returns_zero(monkeypatch):
    monkeypatch.setattr(disp, "_warned_single_sample", False)
    z = torch.randn(1, 5, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = [float(REGULARIZERS.build("dispersive", variant=v)(z)) for v in VARIANTS]
        values.append(float(infonce_l2(z)))
    assert values == [0.0] * 5
    assert sum("no negatives" in str(w.message) for w in caught) == 1


# ----------------------------------------------------------------------------------------------
# Features come from the gradient-carrying forward.


def _perturbed_test_dit():
    torch.manual_seed(0)
    net = BACKBONES.build("test_dit", input_shape=(4, 8, 8), num_classes=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("objective", ["meanflow", "flow_matching"])
def test_features_carry_gradients_to_parameters(objective):
    net = _perturbed_test_dit()
    x = torch.randn(6, 4, 8, 8)
    out = OBJECTIVES.build(objective).loss(net, x, None, step=0, feature_blocks=(0,))
    assert len(out.features) == 1 and out.features[0].shape[0] == 6
    assert out.features[0].requires_grad  # a no-grad pass would fail here and in backward below
    net.zero_grad(set_to_none=True)
    REGULARIZERS.build("dispersive")(out.features[0]).backward()
    block0 = [p for n, p in net.named_parameters() if n.startswith("blocks.0.")]
    assert block0, "test_dit has no parameters named blocks.0.*"
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in block0)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_loop_logs_dispersive(tmp_path):
    from onestep.cli import main

    recipe = tmp_path / "disp.yaml"
    recipe.write_text(
        "seed: 1\n"
        "data: {name: checkerboard}\n"
        "backbone: {name: test_mlp}\n"
        "objective: {name: meanflow}\n"
        "regularizers:\n"
        "  - {name: dispersive, variant: infonce_l2, weight: 0.5, tau: 0.5, blocks: encoder, gather: false}\n"
        "train: {steps: 3, batch_size: 16, lr: 0.001, log_every: 1, num_preview: 4}\n"
        "eval: {nfe: [1], num_samples: 64, batch_size: 64}\n"
    )
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress"]) == 0
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2, 3]
    for s in stats:
        assert -math.log(16) - 1e-4 <= s["loss_dispersive"] <= 1e-6 and math.isfinite(s["loss_main"])
        assert s["loss"] == pytest.approx(s["loss_main"] + 0.5 * s["loss_dispersive"], abs=1e-5)
        assert 0 < s["feature_rms_dispersive"] < 1e3  # the scale of the regularized block's features


@pytest.mark.parametrize("objective", ["meanflow", "flow_matching"])
def test_weight_zero_trains_the_plain_runs_weights(tmp_path, objective):
    """The control of every dispersive comparison: the regularizer's machinery (block features from
    the JVP's primal pass, the hooks, the extra logs) changes nothing by itself, so a run with the term
    at weight 0 trains bit for bit the weights of the run without it, and weight 0.5 does not."""
    from onestep.config import load_config
    from onestep.train.loop import Trainer

    def train(regularizers: str):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            "seed: 1\ndata: {name: checkerboard}\nbackbone: {name: test_mlp}\n"
            f"objective: {{name: {objective}}}\n{regularizers}"
            "train: {steps: 4, batch_size: 16, lr: 0.001, log_every: 1, num_preview: 4, sample_every: 0}\n"
        )
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        trainer = Trainer(load_config(recipe), run)
        trainer.run()
        return trainer.net.state_dict()

    term = "regularizers:\n  - {{name: dispersive, variant: infonce_l2, weight: {}, tau: 0.5, blocks: encoder}}\n"
    plain, zero, half = train(""), train(term.format(0.0)), train(term.format(0.5))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert not all(torch.equal(plain[k], half[k]) for k in plain)


# ----------------------------------------------------------------------------------------------
# gather: true on a 2-process gloo group.


def _gather_worker(rank, world_size, init_method, full):
    """Each rank holds one slice of ``full``; uses DispersiveLoss directly (the registry would import
    every component in each child)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        local_b = full.shape[0] // world_size
        for variant in VARIANTS:
            # Single process on the concatenated batch.
            z_all = full.clone().requires_grad_(True)
            reference = disp.DispersiveLoss(variant)(z_all)
            reference.backward()
            # Gathered, from this rank's slice.
            z = full[rank * local_b : (rank + 1) * local_b].clone().requires_grad_(True)
            value = disp.DispersiveLoss(variant, gather=True)(z)
            value.backward()
            torch.testing.assert_close(value, reference.detach(), rtol=1e-5, atol=1e-6)
            expected = world_size * z_all.grad[rank * local_b : (rank + 1) * local_b]  # documented scale W
            torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-6)
            local = disp.DispersiveLoss(variant, gather=False)(z.detach())
            assert not torch.allclose(local, reference.detach())  # gathering changed the batch
    finally:
        dist.destroy_process_group()


def test_gather_equals_concatenated_batch(tmp_path):
    full = torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    init = f"file://{tmp_path / 'pg_init'}"
    torch.multiprocessing.spawn(_gather_worker, args=(2, init, full), nprocs=2, join=True)


def test_gather_without_process_group_is_local():
    z = torch.randn(5, 4)
    assert float(REGULARIZERS.build("dispersive", gather=True)(z)) == pytest.approx(float(infonce_l2(z)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(variant):
    z = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    fn = {"hinge": lambda a: hinge(a, margin=4.0)}.get(variant, FAST[variant])
    assert torch.autograd.gradcheck(fn, (z,))


def test_offset_features_stay_accurate():
    g = torch.Generator().manual_seed(3)
    z = 1000.0 + 0.1 * torch.randn(6, 32, generator=g)  # small spread on a large offset, float32
    assert float(infonce_l2(z, tau=0.01)) == pytest.approx(slow_infonce_l2(z, 0.01), rel=1e-3, abs=1e-4)
    assert float(infonce_l2(z.bfloat16())) == pytest.approx(slow_infonce_l2(z.bfloat16().float(), 0.5), abs=1e-3)
