"""Download-free, sample-based distribution metrics.

Each registered factory returns a ``SampleMetric``: ``metric(samples (N, ...), reference (M, ...)) -> float``.
Non-batch dimensions are flattened, so X = {x_i} (N, D) are the generated samples and
Y = {y_j} (M, D) the reference (data) samples, compared in the given space (data coordinates for
toy sets, pixels for images). Arithmetic is float64 on the inputs' device; pairwise distances are
computed in row chunks of 128 MiB, so N = M = 20k in 64 dims peaks near 1 GiB of CPU memory.

"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from onestep.eval.base import Metric
from onestep.registry import METRICS, ConfigError

# Bytes of float64 per pairwise-distance chunk (rows * M * 8 <= this).
_CHUNK_BYTES = 1 << 27


class SampleMetric(Metric):
    """A sample-based metric of flattened samples against reference samples (any data kind)."""

    min_samples: int = 1

    def __call__(self, samples: Tensor, reference: Tensor | None = None, labels: Tensor | None = None) -> float:
        if reference is None:
            raise ValueError(f"{self.name}: needs reference samples")
        x, y = _prepare(samples, reference, self.name, self.min_samples)
        return float(self.compute(x, y))

    def compute(self, x: Tensor, y: Tensor) -> float:
        """x (N, D), y (M, D) float64 on one device."""
        raise NotImplementedError


def _prepare(samples: Tensor, reference: Tensor, name: str, min_samples: int) -> tuple[Tensor, Tensor]:
    """Flatten to (N, D) / (M, D) float64 on the samples' device; check shapes."""
    samples, reference = torch.as_tensor(samples), torch.as_tensor(reference)
    if samples.dim() == 0 or reference.dim() == 0:
        raise ValueError(f"{name}: samples and reference need a batch dimension")
    x = samples.detach().reshape(samples.shape[0], -1).to(torch.float64)
    y = reference.detach().to(x.device).reshape(reference.shape[0], -1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{name}: samples have shape {tuple(samples.shape[1:])} but reference has {tuple(reference.shape[1:])}"
        )
    if len(x) < min_samples or len(y) < min_samples:
        raise ValueError(
            f"{name}: needs at least {min_samples} samples and reference points, got {len(x)} and {len(y)}"
        )
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError(f"{name}: samples or reference contain NaN or inf")
    return x, y


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK_BYTES // (8 * max(n_cols, 1)))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _dists(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances (len(a), len(b))."""
    return torch.cdist(a, b)


def mean_pairwise_distance(a: Tensor, b: Tensor) -> float:
    """(1 / (N M)) sum_{i,j} |a_i - b_j| over all pairs (diagonal included when a is b)."""
    total = 0.0
    for rows in _row_chunks(len(a), len(b)):
        total += _dists(a[rows], b).sum().item()
    return total / (len(a) * len(b))


def knn_radii(a: Tensor, k: int) -> Tensor:
    """Distance of every a_i to its k-th nearest neighbour in a, itself excluded. (N,)"""
    out = torch.empty(len(a), dtype=a.dtype, device=a.device)
    for rows in _row_chunks(len(a), len(a)):
        # The k+1 smallest include the point itself (distance 0).
        out[rows] = _dists(a[rows], a).topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def in_any_ball(queries: Tensor, centers: Tensor, radii: Tensor) -> Tensor:
    """Bool (Q,): query q lies in some closed ball B(c_j, r_j), i.e. |q - c_j| <= r_j."""
    out = torch.empty(len(queries), dtype=torch.bool, device=queries.device)
    for rows in _row_chunks(len(queries), len(centers)):
        out[rows] = (_dists(queries[rows], centers) <= radii[None, :]).any(1)
    return out


def ball_hit_any(centers: Tensor, radii: Tensor, queries: Tensor) -> Tensor:
    """Bool (C,): ball B(c_j, r_j) contains at least one query point."""
    out = torch.empty(len(centers), dtype=torch.bool, device=centers.device)
    for rows in _row_chunks(len(centers), len(queries)):
        out[rows] = (_dists(centers[rows], queries) <= radii[rows, None]).any(1)
    return out


# ----------------------------------------------------------------------------------------- sliced W2


def quantile_w2_squared(xs: Tensor, ys: Tensor) -> Tensor:
    """Exact squared 2-Wasserstein distance between 1-D empirical measures, per row.

    xs (K, N), ys (K, M) sorted along dim 1. W2^2 = int_0^1 (F_x^-1(q) - F_y^-1(q))^2 dq with the
    empirical quantile functions F_x^-1(q) = xs[floor(q N)], piecewise constant between the
    breakpoints {i/N} and {j/M}; the integral is summed exactly over the merged breakpoints
    (for N == M this is the mean squared difference of the sorted values). Returns (K,).
    """
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return (xs - ys).square().mean(1)
    opts = dict(dtype=torch.float64, device=xs.device)
    edges = torch.cat([torch.arange(1, n + 1, **opts) / n, torch.arange(1, m + 1, **opts) / m]).unique()
    widths = torch.diff(edges, prepend=edges.new_zeros(1))
    mids = edges - widths / 2
    ix = (mids * n).floor().long().clamp_(0, n - 1)
    iy = (mids * m).floor().long().clamp_(0, m - 1)
    return ((xs[:, ix] - ys[:, iy]).square() * widths).sum(1)


class SlicedWasserstein(SampleMetric):
    """Sliced 2-Wasserstein distance.

    SW2(P, Q) = ( E_theta W2^2(theta#P, theta#Q) )^(1/2), theta uniform on the unit sphere S^(D-1),
    estimated with K fixed directions (Gaussian draws from ``seed``, normalized) and the exact 1-D
    W2 between the projected empirical measures (quantile matching when N != M).
    For N(a, s^2 I) vs N(b, s^2 I): W2^2(theta#P, theta#Q) = (theta.(a - b))^2 and
    E (theta.v)^2 = |v|^2 / D, so SW2 = |a - b| / sqrt(D).
    """

    name = "sliced_wasserstein"
    higher_is_better = False

    def __init__(self, num_projections: int = 256, seed: int = 0):
        self.num_projections, self.seed = num_projections, seed
        self.implementation = f"onestep.sliced_wasserstein/v1 ({num_projections} projections, seed {seed})"

    def directions(self, dim: int, device: torch.device | str = "cpu") -> Tensor:
        """The K unit directions (K, dim), float64; the same for a given (seed, dim)."""
        g = torch.Generator().manual_seed(self.seed)
        theta = torch.randn(self.num_projections, dim, generator=g, dtype=torch.float64)
        return (theta / theta.norm(dim=1, keepdim=True)).to(device)

    def compute(self, x, y):
        theta = self.directions(x.shape[1], x.device)
        xs = (theta @ x.T).sort(dim=1).values  # (K, N)
        ys = (theta @ y.T).sort(dim=1).values
        return math.sqrt(quantile_w2_squared(xs, ys).mean().item())


@METRICS.register("sliced_wasserstein")
def sliced_wasserstein(num_projections: int = 256, seed: int = 0) -> SlicedWasserstein:
    """SW2 with ``num_projections`` random directions drawn from ``seed`` (lower is better)."""
    if num_projections < 1:
        raise ConfigError(f"metric 'sliced_wasserstein': key 'num_projections' must be >= 1, got {num_projections}")
    return SlicedWasserstein(num_projections, seed)


# ----------------------------------------------------------------------------------- energy distance


class EnergyDistance(SampleMetric):
    """Energy distance, V-statistic (all pairs, diagonal included):

    ED = 2/(N M) sum_{i,j} |x_i - y_j| - 1/N^2 sum_{i,i'} |x_i - x_i'| - 1/M^2 sum_{j,j'} |y_j - y_j'|.

    The V-statistic is the energy distance between the two empirical measures, hence >= 0 and
    symmetric (the U-statistic is unbiased but can be negative). It is a squared quantity
    (units of distance), ~ O(1/N) for two samples of one distribution.
    """

    name = "energy_distance"
    higher_is_better = False
    implementation = "onestep.energy_distance/v1 (V-statistic, euclidean)"

    def compute(self, x, y):
        xy = mean_pairwise_distance(x, y)
        xx = mean_pairwise_distance(x, x)
        yy = mean_pairwise_distance(y, y)
        return max(2.0 * xy - xx - yy, 0.0)


@METRICS.register("energy_distance")
def energy_distance() -> EnergyDistance:
    """Energy distance (V-statistic) between samples and reference (lower is better)."""
    return EnergyDistance()


# ------------------------------------------------------------------------ precision / recall / coverage


class _KNNMetric(SampleMetric):
    """k-NN manifold metrics in data space (flattened samples), or with ``classifier`` in that
    reference classifier's feature space against its family's test split (``reference_split``; the
    evaluator fills ``classifier`` and ``dataset`` in for data that has one)."""

    higher_is_better = True

    def __init__(self, k: int = 3, classifier: str | None = None):
        self.k = k
        self.min_samples = k + 1
        self.classifier = classifier
        self.dataset = None
        if classifier is not None:
            from onestep.eval.classifiers import SPECS

            if classifier not in SPECS:
                raise ConfigError(
                    f"metric '{self.name}': key 'classifier' must be one of {', '.join(sorted(SPECS))}, "
                    f"got {classifier!r}"
                )
            self.kinds, self.reference_split = ("image",), "test"

    def _classifier(self):
        from onestep.eval.classifiers import load_classifier

        return load_classifier(self.classifier, self.dataset)

    @property
    def implementation(self) -> str:
        if self.classifier is None:
            return f"onestep.{self.name}/v1 (k={self.k}, euclidean on flattened samples)"
        return f"{self._classifier().implementation}, penultimate features, {self.name} k={self.k} euclidean"

    def __call__(self, samples: Tensor, reference: Tensor | None = None, labels: Tensor | None = None) -> float:
        if self.classifier is not None and reference is not None:
            clf = self._classifier()
            samples, reference = clf.features_and_probs(samples)[0], clf.features_and_probs(reference)[0]
        return super().__call__(samples, reference, labels)


class Precision(_KNNMetric):
    """k-NN precision (Kynkäänniemi et al. 2019): the fraction of samples inside the reference
    manifold, the union of balls B(y_j, r_k(y_j)) with r_k the distance to the k-th nearest other
    reference point. precision = 1/N sum_i 1[exists j: |x_i - y_j| <= r_k(y_j)]."""

    name = "precision"

    def compute(self, x, y):
        return in_any_ball(x, y, knn_radii(y, self.k)).double().mean().item()


class Recall(_KNNMetric):
    """k-NN recall (Kynkäänniemi et al. 2019): the fraction of reference points inside the sample
    manifold. recall = 1/M sum_j 1[exists i: |y_j - x_i| <= r_k(x_i)], r_k among the samples."""

    name = "recall"

    def compute(self, x, y):
        return in_any_ball(y, x, knn_radii(x, self.k)).double().mean().item()


class Coverage(_KNNMetric):
    """Coverage (Naeem et al. 2020): the fraction of reference balls that contain a sample.
    coverage = 1/M sum_j 1[exists i: |x_i - y_j| <= r_k(y_j)]. Default k = 5 (the paper's); precision
    and recall default to k = 3 (Kynkäänniemi et al.'s)."""

    name = "coverage"

    def __init__(self, k: int = 5, classifier: str | None = None):
        super().__init__(k, classifier)

    def compute(self, x, y):
        return ball_hit_any(y, knn_radii(y, self.k), x).double().mean().item()


def _check_k(name: str, k: int) -> None:
    if k < 1:
        raise ConfigError(f"metric '{name}': key 'k' must be >= 1, got {k}")


@METRICS.register("precision")
def precision(k: int = 3, classifier: str | None = None) -> Precision:
    """k-NN precision of samples against the reference (higher is better).

    ``classifier``: in that reference classifier's feature space."""
    _check_k("precision", k)
    return Precision(k, classifier)


@METRICS.register("recall")
def recall(k: int = 3, classifier: str | None = None) -> Recall:
    """k-NN recall of samples against the reference (higher is better).

    ``classifier``: in that reference classifier's feature space."""
    _check_k("recall", k)
    return Recall(k, classifier)


@METRICS.register("coverage")
def coverage(k: int = 5, classifier: str | None = None) -> Coverage:
    """Coverage of the reference k-NN balls by samples (higher is better).

    ``classifier``: in that reference classifier's feature space."""
    _check_k("coverage", k)
    return Coverage(k, classifier)


# ---------------------------------------------------------------------------------------- RBF MMD


class MMDRBF(SampleMetric):
    """Squared maximum mean discrepancy with a Gaussian kernel, V-statistic:

    MMD^2 = mean_{i,i'} k(x_i, x_i') + mean_{j,j'} k(y_j, y_j') - 2 mean_{i,j} k(x_i, y_j),
    k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2)), bandwidth in data units (fixed, not data-dependent,
    so numbers stay comparable across runs). >= 0 and symmetric.
    """

    name = "mmd_rbf"
    higher_is_better = False

    def __init__(self, bandwidth: float = 1.0):
        self.bandwidth = bandwidth
        self.implementation = f"onestep.mmd_rbf/v1 (V-statistic, bandwidth {bandwidth:g})"

    def _mean_kernel(self, a: Tensor, b: Tensor) -> float:
        scale = -0.5 / self.bandwidth**2
        total = 0.0
        for rows in _row_chunks(len(a), len(b)):
            total += _dists(a[rows], b).square_().mul_(scale).exp_().sum().item()
        return total / (len(a) * len(b))

    def compute(self, x, y):
        value = self._mean_kernel(x, x) + self._mean_kernel(y, y) - 2.0 * self._mean_kernel(x, y)
        return max(value, 0.0)


@METRICS.register("mmd_rbf")
def mmd_rbf(bandwidth: float = 1.0) -> MMDRBF:
    """Gaussian-kernel MMD^2 with a fixed ``bandwidth`` in data units (lower is better)."""
    if not bandwidth > 0:
        raise ConfigError(f"metric 'mmd_rbf': key 'bandwidth' must be > 0, got {bandwidth!r}")
    return MMDRBF(float(bandwidth))


# ------------------------------------------------------------------------- checkerboard off-support


class CheckerboardOutside(Metric):
    """The share of 2-D samples outside the checkerboard's dark cells (the ``checkerboard`` dataset:
    [−4, 4]², cell side 2, (x, y) dark when ⌊x/2⌋ + ⌊y/2⌋ is even): 0 for the data itself; the haze
    between cells that sliced-W barely sees. Lower is better."""

    name = "checkerboard_outside"
    kinds = ("vector",)
    needs_reference = False
    higher_is_better = False
    implementation = "onestep.checkerboard_outside/v1 (share outside the 8 dark cells of [-4, 4]^2)"

    def __call__(self, samples: Tensor, reference: Tensor | None = None, labels: Tensor | None = None) -> float:
        x = torch.as_tensor(samples).detach().double().reshape(len(samples), -1)
        if x.shape[1] != 2 or len(x) == 0:
            raise ValueError(f"{self.name}: needs 2-D samples (N, 2), got shape {tuple(samples.shape)}")
        inside_board = (x.abs() <= 4.0).all(1)
        dark = (torch.floor(x[:, 0] / 2) + torch.floor(x[:, 1] / 2)).remainder(2) == 0
        return float((~(inside_board & dark)).double().mean())


@METRICS.register("checkerboard_outside")
def checkerboard_outside() -> CheckerboardOutside:
    """Share of samples outside the checkerboard's dark cells (lower is better; the data scores 0)."""
    return CheckerboardOutside()
