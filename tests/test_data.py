"""Shipped datasets: the toy distributions against their definitions, digits, and BatchStream."""

import math

import pytest
import torch

from onestep.data import BatchStream, Dataset, TensorDataset
from onestep.data.images import digits_split_indices
from onestep.data.toy import CHECKERBOARD_DARK_CELLS
from onestep.registry import DATASETS, ConfigError

TOY_SETS = ["checkerboard", "eight_gaussians", "two_moons", "spirals", "rings", "gaussian"]


def draw(name, n, seed=0, **kwargs):
    x, y = DATASETS.build(name, **kwargs).generate(n, torch.Generator().manual_seed(seed))
    assert y is None
    return x


def test_registry_lists_shipped_datasets():
    assert set(TOY_SETS + ["digits"]) <= set(DATASETS.names())


# ------------------------------------------------------------------------------------------ toy sets


@pytest.mark.parametrize("name", TOY_SETS)
def test_toy_set_protocol_range_and_determinism(name):
    data = DATASETS.build(name)
    assert isinstance(data, Dataset)
    assert data.size is None and data.kind == "vector" and data.num_classes == 0 and data.shape == (2,)
    x = draw(name, 4000, seed=1)
    assert x.shape == (4000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    # Roughly [-4, 4]^2: the bulk inside (eight_gaussians spills over by its std), nothing far outside.
    assert (x.abs() <= 4.5).float().mean() > 0.9 and x.abs().max() < 7.0
    assert x.std(0).min() > 0.5
    assert torch.equal(x, draw(name, 4000, seed=1))
    assert not torch.equal(x, draw(name, 4000, seed=2))
    assert draw(name, 0).shape == (0, 2)


def test_checkerboard_dark_cells_uniform():
    n = 40_000
    x = draw("checkerboard", n).double()
    assert (x >= -4).all() and (x < 4).all()
    cell = torch.floor(x / 2).long()  # (n, 2) cell indices in -2..1
    assert ((cell.sum(1) % 2) == 0).all(), "a sample fell in a light cell"
    counts = torch.bincount((cell[:, 0] + 2) * 4 + (cell[:, 1] + 2), minlength=16).reshape(4, 4).double()
    dark = torch.tensor([[(i + j) % 2 == 0 for j in range(-2, 2)] for i in range(-2, 2)])
    assert dark.sum() == len(CHECKERBOARD_DARK_CELLS) == 8
    assert (counts[~dark] == 0).all()
    # Each dark cell holds n/8 up to 5 binomial standard deviations.
    p = 1 / 8
    tolerance = 5 * math.sqrt(n * p * (1 - p))
    assert ((counts[dark] - n * p).abs() < tolerance).all(), counts
    # Uniform inside the cell: offsets in [0, 2)^2 with mean 1 and variance 4/12.
    offset = x - 2 * cell
    assert (offset.mean(0) - 1).abs().max() < 0.02
    assert (offset.var(0) - 1 / 3).abs().max() < 0.02


def test_eight_gaussians_components_match_spec():
    n = 40_000
    x = draw("eight_gaussians", n).double()
    k = torch.arange(8, dtype=torch.float64)
    centers = 4 * torch.stack([torch.cos(2 * math.pi * k / 8), torch.sin(2 * math.pi * k / 8)], 1)
    # Centers are 3.06 apart and std is 0.5: nearest-center assignment is essentially exact.
    assign = torch.cdist(x, centers).argmin(1)
    for c in range(8):
        members = x[assign == c]
        assert abs(len(members) / n - 1 / 8) < 0.01
        assert (members.mean(0) - centers[c]).abs().max() < 0.03
        assert (members.std(0) - 0.5).abs().max() < 0.03


def test_eight_gaussians_kwargs():
    x = draw("eight_gaussians", 8000, radius=2.0, std=0.1).double()
    assert (x.norm(dim=1) - 2.0).abs().max() < 0.6
    with pytest.raises(ConfigError):
        DATASETS.build("eight_gaussians", std=0.0)


def test_rings_lie_on_their_radii():
    x = draw("rings", 6000, num_rings=3, scale=3.0, noise=0.0).double()
    radius = x.norm(dim=1)
    nearest = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)[
        (radius[:, None] - torch.tensor([1.0, 2.0, 3.0])).abs().argmin(1)
    ]
    assert (radius - nearest).abs().max() < 1e-5
    # Ring k is chosen with probability k / 6 (uniform along the total length).
    fractions = torch.stack([((nearest == r).double().mean()) for r in (1.0, 2.0, 3.0)])
    assert (fractions - torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64)).abs().max() < 0.03


def test_two_moons_and_spirals_noise_free_shapes():
    moons = draw("two_moons", 4000, noise=0.0, scale=1.0).double() + torch.tensor([0.5, 0.25], dtype=torch.float64)
    upper = moons.norm(dim=1)
    lower = (moons - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1)
    assert torch.minimum((upper - 1).abs(), (lower - 1).abs()).max() < 1e-5
    spiral = draw("spirals", 4000, noise=0.0, scale=3.0).double()
    assert spiral.norm(dim=1).max() <= 3.0 + 1e-5


def test_gaussian_matches_kwargs_and_validates():
    x = draw("gaussian", 20_000, dim=3, mean=[1.0, -2.0, 0.5], std=2.0).double()
    assert x.shape == (20_000, 3)
    assert (x.mean(0) - torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).abs().max() < 0.06
    assert (x.std(0) - 2.0).abs().max() < 0.05
    assert DATASETS.build("gaussian", dim=5, mean=1.5).shape == (5,)
    with pytest.raises(ConfigError, match="mean"):
        DATASETS.build("gaussian", dim=2, mean=[0.0, 1.0, 2.0])
    with pytest.raises(ConfigError, match="dim"):
        DATASETS.build("gaussian", dim="3")
    with pytest.raises(ConfigError, match="allowed"):
        DATASETS.build("gaussian", sigma=1.0)


# -------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def all_digits():
    return DATASETS.build("digits")


def test_digits_contents(all_digits):
    from sklearn.datasets import load_digits

    data = all_digits
    assert isinstance(data, TensorDataset)
    assert data.size == 1797 and data.shape == (1, 8, 8) and data.kind == "image" and data.num_classes == 10
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert data.x.min() == -1.0 and data.x.max() == 1.0
    assert torch.equal(data.y.unique(), torch.arange(10))
    raw = load_digits()
    assert torch.allclose(data.x[5, 0], torch.as_tensor(raw.images[5], dtype=torch.float32) / 8 - 1)
    assert torch.equal(data.y, torch.as_tensor(raw.target, dtype=torch.int64))


def test_digits_splits_disjoint_and_cover(all_digits):
    train = DATASETS.build("digits", split="train")
    test = DATASETS.build("digits", split="test")
    i_train, i_test = digits_split_indices("train"), digits_split_indices("test")
    assert train.size == len(i_train) and test.size == len(i_test)
    assert set(i_train.tolist()).isdisjoint(i_test.tolist())
    assert sorted(i_train.tolist() + i_test.tolist()) == list(range(1797))
    assert abs(train.size / 1797 - 0.8) < 0.01
    assert torch.equal(train.x, all_digits.x[i_train]) and torch.equal(test.y, all_digits.y[i_test])
    assert torch.equal(test.y.unique(), torch.arange(10))
    # Fixed: the same split every time.
    assert torch.equal(DATASETS.build("digits", split="test").x, test.x)


def test_digits_unconditional_and_upsampled(all_digits):
    plain = DATASETS.build("digits", conditional=False)
    assert plain.num_classes == 0 and plain.y is None
    x, y = plain.get(torch.arange(4))
    assert y is None and x.shape == (4, 1, 8, 8)
    big = DATASETS.build("digits", image_size=16)
    assert big.shape == (1, 16, 16) and big.size == 1797
    assert big.x.min() >= -1.0 and big.x.max() <= 1.0
    # Bilinear 2x upsampling keeps each image's mean intensity (up to edge effects).
    assert (big.x.mean((1, 2, 3)) - all_digits.x.mean((1, 2, 3))).abs().max() < 0.05


def test_digits_bad_kwargs():
    with pytest.raises(ConfigError, match="split"):
        DATASETS.build("digits", split="val")
    with pytest.raises(ConfigError, match="image_size"):
        DATASETS.build("digits", image_size=4)
    with pytest.raises(ConfigError, match="conditional"):
        DATASETS.build("digits", conditional="yes")


# --------------------------------------------------------------------------------------- BatchStream


def test_batch_stream_covers_an_epoch_without_repetition(all_digits):
    batch = 64
    stream = BatchStream(all_digits, batch, seed=3)
    steps = math.ceil(1797 / batch) + 1
    order = torch.cat([stream.indices(s) for s in range(steps)])
    epoch0, epoch1 = order[:1797], order[1797:]
    assert torch.equal(epoch0.sort().values, torch.arange(1797))
    assert len(epoch1.unique()) == len(epoch1)
    # A new epoch is a different permutation.
    assert not torch.equal(epoch1, epoch0[: len(epoch1)])
    x, y = stream.batch(5)
    assert torch.equal(x, all_digits.x[stream.indices(5)]) and torch.equal(y, all_digits.y[stream.indices(5)])


def test_batch_stream_is_a_function_of_seed_and_step(all_digits):
    a = BatchStream(all_digits, 32, seed=7)
    b = BatchStream(all_digits, 32, seed=7)
    for step in (0, 9, 56, 1000):  # 56 straddles an epoch boundary
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(1)[0], a.batch(2)[0])
    assert not torch.equal(a.indices(0), BatchStream(all_digits, 32, seed=8).indices(0))


def test_batch_stream_rank_slices_concatenate_to_world_batch(all_digits):
    single = BatchStream(all_digits, 64, seed=1)
    ranks = [BatchStream(all_digits, 64, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in (0, 3, 28, 29, 500):  # step 28 straddles the first epoch boundary
        x, y = single.batch(step)
        parts = [r.batch(step) for r in ranks]
        assert parts[0][0].shape[0] == 32
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="divisible"):
        BatchStream(all_digits, 63, seed=1, world_size=2)


def test_batch_stream_on_generated_data():
    data = DATASETS.build("checkerboard")
    stream = BatchStream(data, 128, seed=0)
    x, y = stream.batch(4)
    assert x.shape == (128, 2) and y is None
    assert torch.equal(x, BatchStream(data, 128, seed=0).batch(4)[0])
    assert not torch.equal(x, stream.batch(5)[0])


def test_reference_draws_are_seeded(all_digits):
    data = DATASETS.build("eight_gaussians")
    assert torch.equal(data.reference(100)[0], data.reference(100)[0])
    x, y = all_digits.reference(100)
    assert x.shape == (100, 1, 8, 8) and y.shape == (100,)
    assert all_digits.reference(5000)[0].shape[0] == 1797
