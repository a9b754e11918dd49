"""Sample-based metrics: closed forms, invariants, and same-vs-shifted behaviour."""

import math

import pytest
import torch

from onestep.eval import sample_metrics as M
from onestep.registry import DATASETS, METRICS, ConfigError

DISTANCES = ["sliced_wasserstein", "energy_distance", "mmd_rbf"]
KNN = ["precision", "recall", "coverage"]


def normal(n, dim=2, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) + torch.as_tensor(shift, dtype=torch.float64)


def test_registry_lists_metrics_with_descriptions():
    assert set(DISTANCES + KNN) <= set(METRICS.names())
    for name in DISTANCES + KNN:
        metric = METRICS.build(name)
        assert metric.name == name
        assert metric.implementation.startswith(f"onestep.{name}/v1")
        assert metric.higher_is_better == (name in KNN)
    assert "256 projections, seed 0" in METRICS.build("sliced_wasserstein").implementation
    assert (
        METRICS.build("sliced_wasserstein", num_projections=64, seed=3).implementation
        != METRICS.build("sliced_wasserstein").implementation
    )
    assert "k=3" in METRICS.build("precision", k=3).implementation


def test_bad_kwargs_and_inputs_are_reported():
    with pytest.raises(ConfigError):
        METRICS.build("sliced_wasserstein", num_projections=0)
    with pytest.raises(ConfigError):
        METRICS.build("precision", k=0)
    with pytest.raises(ConfigError):
        METRICS.build("mmd_rbf", bandwidth=-1.0)
    metric = METRICS.build("energy_distance")
    with pytest.raises(ValueError, match="shape"):
        metric(torch.zeros(10, 2), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="NaN"):
        metric(torch.full((10, 2), float("nan")), torch.zeros(10, 2))
    with pytest.raises(ValueError, match="at least"):
        METRICS.build("recall", k=5)(torch.zeros(5, 2), torch.zeros(50, 2))


@pytest.mark.parametrize("name", DISTANCES)
def test_distance_is_small_for_same_distribution_and_grows_with_shift(name):
    metric = METRICS.build(name)
    x = normal(1500, seed=0)
    y = normal(1200, seed=1)  # N != M on purpose
    direction = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    shifted = [metric(x, y + s * direction) for s in (0.5, 1.0, 2.0, 4.0)]
    same = metric(x, y)
    assert isinstance(same, float) and same >= 0
    assert same < 0.2 * shifted[0], (same, shifted)
    assert all(a < b for a, b in zip(shifted, shifted[1:])), shifted
    assert metric(x, x) == pytest.approx(0.0, abs=1e-9)


def test_distances_tell_toy_sets_apart():
    g = lambda name, seed: DATASETS.build(name).generate(1500, torch.Generator().manual_seed(seed))[0]  # noqa: E731
    board, board2, gauss8 = g("checkerboard", 0), g("checkerboard", 1), g("eight_gaussians", 0)
    for name in DISTANCES:
        metric = METRICS.build(name)
        assert metric(board, board2) < 0.2 * metric(board, gauss8), name


# ------------------------------------------------------------------------------------- sliced W2


def test_quantile_w2_matches_replicated_samples():
    # N = 6, M = 4: repeating x twice and y three times gives equal-size samples (12) whose sorted
    # mean squared difference is the exact W2^2 between the two empirical measures.
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(3, 6, generator=g, dtype=torch.float64).sort(1).values
    ys = torch.randn(3, 4, generator=g, dtype=torch.float64).sort(1).values
    brute = (xs.repeat_interleave(2, 1) - ys.repeat_interleave(3, 1)).square().mean(1)
    assert torch.allclose(M.quantile_w2_squared(xs, ys), brute, rtol=1e-12, atol=0)
    assert torch.allclose(M.quantile_w2_squared(ys, xs), brute, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shift", [0.5, 1.0, 2.0])
def test_sliced_w2_of_1d_gaussians_is_the_shift(shift):
    # In 1-D every direction is +-1 and W2(N(0,1), N(m,1)) = |m|, so SW2 = |m| exactly, whatever K.
    x = normal(20_000, dim=1, seed=0)
    y = normal(15_000, dim=1, seed=1, shift=shift)
    value = METRICS.build("sliced_wasserstein", num_projections=4)(x, y)
    assert value == pytest.approx(shift, abs=0.03)
    assert METRICS.build("sliced_wasserstein", num_projections=1, seed=5)(x, y) == pytest.approx(value, rel=1e-9)


def test_sliced_w2_of_shifted_gaussians_in_d_dims():
    # Projections of N(0, I) and N(v, I) on a unit theta are N(0, 1) and N(theta.v, 1), so
    # W2^2 = (theta.v)^2, and with E (theta.v)^2 = |v|^2 / D: SW2 = |v| / sqrt(D).
    dim = 4
    v = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64)
    metric = METRICS.build("sliced_wasserstein", num_projections=512, seed=0)
    exact_for_these_directions = (metric.directions(dim) @ v).square().mean().sqrt().item()
    assert exact_for_these_directions == pytest.approx(v.norm().item() / math.sqrt(dim), rel=0.05)
    value = metric(normal(6000, dim, seed=0), normal(6000, dim, seed=1, shift=v))
    assert value == pytest.approx(exact_for_these_directions, abs=0.04)


def test_sliced_w2_is_deterministic_and_flattens():
    x = normal(500, dim=64, seed=0).reshape(500, 1, 8, 8)
    y = normal(400, dim=64, seed=1, shift=0.3).reshape(400, 1, 8, 8)
    metric = METRICS.build("sliced_wasserstein")
    assert metric(x, y) == METRICS.build("sliced_wasserstein")(x.clone(), y.clone())
    assert metric(x, y) == pytest.approx(metric(x.reshape(500, 64), y.reshape(400, 64)), rel=1e-12)
    assert metric(x.float(), y.float()) == pytest.approx(metric(x, y), rel=1e-5)


# -------------------------------------------------------------------------------- energy distance


def test_energy_distance_nonnegative_symmetric_and_matches_brute_force():
    metric = METRICS.build("energy_distance")
    for seed in range(4):
        x = normal(50 + seed, seed=seed)
        y = normal(30, seed=100 + seed, shift=0.1 * seed)
        value = metric(x, y)
        assert value >= 0
        assert metric(y, x) == pytest.approx(value, rel=1e-10, abs=1e-12)
        brute = 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()
        assert value == pytest.approx(brute.item(), rel=1e-8, abs=1e-12)


def test_energy_distance_closed_forms():
    metric = METRICS.build("energy_distance")
    # Two point masses a, b: ED = 2|a - b|.
    a, b = torch.zeros(7, 3), torch.tensor([[3.0, 4.0, 0.0]]).repeat(5, 1)
    assert metric(a, b) == pytest.approx(10.0, rel=1e-9)
    # N(0,1) vs N(m,1): E|X - Y| = sqrt(2) E|Z + m/sqrt(2)| for standard Z, E|X - X'| = 2/sqrt(pi).
    m = 1.0
    s = math.sqrt(2.0)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-m * m / (2 * s * s)) + m * math.erf(m / (s * math.sqrt(2)))
    expected = 2 * e_xy - 2 * (2 / math.sqrt(math.pi))
    value = metric(normal(3000, dim=1, seed=0), normal(3000, dim=1, seed=1, shift=m))
    assert value == pytest.approx(expected, abs=0.05)


def test_pairwise_chunking_does_not_change_results(monkeypatch):
    x, y = normal(300, dim=5, seed=0), normal(200, dim=5, seed=1, shift=0.5)
    names = ["energy_distance", "mmd_rbf", "precision", "recall", "coverage"]
    whole = {name: METRICS.build(name)(x, y) for name in names}
    monkeypatch.setattr(M, "_CHUNK_BYTES", 8 * 200 * 7)  # 7 rows per chunk
    for name in names:
        assert METRICS.build(name)(x, y) == pytest.approx(whole[name], rel=1e-10), name


def test_mmd_rbf_matches_brute_force():
    x, y = normal(40, seed=0), normal(30, seed=1, shift=0.7)
    kernel = lambda a, b: torch.exp(-torch.cdist(a, b).square() / (2 * 1.5**2))  # noqa: E731
    brute = kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()
    assert METRICS.build("mmd_rbf", bandwidth=1.5)(x, y) == pytest.approx(brute.item(), rel=1e-9)


# ---------------------------------------------------------------------------- precision / recall


def test_knn_radii_and_precision_by_hand():
    # Points on a line at 0, 1, 3, 6: 1-NN radii 1, 1, 2, 3; the balls cover [-1, 1], [0, 2], [1, 5], [3, 9].
    reference = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)
    assert M.knn_radii(reference, 1).tolist() == [1.0, 1.0, 2.0, 3.0]
    samples = torch.tensor([[-1.0], [4.5], [9.0], [9.5], [-3.0]])
    assert METRICS.build("precision", k=1)(samples, reference) == pytest.approx(3 / 5)
    # Coverage: reference balls hit by some sample: [-1, 1] (by -1), [1, 5] (by 4.5), [3, 9] (by 4.5, 9).
    assert METRICS.build("coverage", k=1)(samples, reference) == pytest.approx(3 / 4)


def test_precision_recall_same_disjoint_and_mode_dropping():
    reference = normal(2000, seed=0)
    same = normal(2000, seed=1)
    values = {name: METRICS.build(name)(same, reference) for name in KNN}
    assert min(values.values()) > 0.9, values
    far = normal(2000, seed=2, shift=50.0)
    assert all(METRICS.build(name)(far, reference) == 0.0 for name in KNN)
    # Samples from one half of the reference: all realistic (precision ~1) but half the data is
    # missed (recall, coverage ~0.5). Swapping samples and reference would swap the two.
    half = same[same[:, 0] > 0]
    precision = METRICS.build("precision")(half, reference)
    recall = METRICS.build("recall")(half, reference)
    assert precision > 0.95
    assert 0.4 < recall < 0.7
    assert METRICS.build("coverage")(half, reference) < 0.7
