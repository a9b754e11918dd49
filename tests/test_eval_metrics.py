"""Digits-classifier metrics and the torch-fidelity path (FID/IS/KID/PRC), all download-free.

The torch-fidelity tests run its real ``calculate_metrics`` with the registered download-free
extractor ``onestep-random-conv``; caches go to a tmp ``ONESTEP_CACHE``.
"""

from __future__ import annotations

import importlib.util
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from waiting import HANG_GUARD_S

from onestep.data.images import digits
from onestep.eval import fidelity
from onestep.eval.classifiers import base as classifier
from onestep.eval.frechet import frechet_distance, gaussian_stats
from onestep.registry import BACKBONES, METRICS, OBJECTIVES, ConfigError

RC = fidelity.RANDOM_CONV
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convs: one thread is several times faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh ONESTEP_CACHE for this module (the classifier is trained into it once)."""
    path = tmp_path_factory.mktemp("onestep_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONESTEP_CACHE", str(path))
        mp.setattr(classifier, "_LOADED", {})
        yield path


@pytest.fixture(scope="module")
def split():
    train, test = digits(split="train"), digits(split="test")
    return train.x, train.y, test.x, test.y


@pytest.fixture(scope="module")
def net(cache):
    return classifier.load_classifier("digits").net


# ------------------------------------------------------------------------------ digits classifier


def test_classifier_trains_caches_and_reaches_97_percent(cache, net, split, monkeypatch):
    _, _, x_test, y_test = split
    spec = classifier.spec_of("digits")
    path = cache / spec.file_name
    assert path.is_file() and path.name == "digits_classifier_v1.pt"
    blob = torch.load(path, weights_only=True)
    assert blob["version"] == spec.version and blob["test_accuracy"] >= 0.97
    assert blob["sha256"] == classifier.weights_sha256(net.state_dict())
    assert classifier.accuracy(net, x_test, y_test) >= 0.97
    # A second process loads the file, it does not retrain: same weights, no training call.
    classifier._LOADED.clear()

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache file is valid")

    monkeypatch.setattr(classifier, "train_classifier", no_training)
    again = classifier.load_classifier("digits")
    for a, b in zip(net.state_dict().values(), again.net.state_dict().values()):
        assert torch.equal(a, b)
    assert f"sha256 {blob['sha256'][:12]}" in again.implementation and "test acc 0.9" in again.implementation


def test_training_is_deterministic_and_the_hash_names_the_weights(cache):
    spec = classifier.spec_of("digits")
    a, acc_a, _ = classifier.train_classifier(spec, progress=False)
    b, acc_b, _ = classifier.train_classifier(spec, progress=False)
    assert acc_a == acc_b and classifier.weights_sha256(a.state_dict()) == classifier.weights_sha256(b.state_dict())
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert classifier.weights_sha256(a.state_dict()) != classifier.weights_sha256(b.state_dict())


def test_corrupt_classifier_cache_is_retrained_with_one_warning_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path))
    monkeypatch.setattr(classifier, "_LOADED", {})
    spec = classifier.spec_of("digits")
    good = classifier.load_classifier("digits", progress=False)
    raw = spec.path().read_bytes()
    capfd.readouterr()
    for garbage in (raw[: len(raw) // 2], b"not a checkpoint", raw.replace(b"test_accuracy", b"test_accuracx")):
        spec.path().write_bytes(garbage)
        classifier._LOADED.clear()
        again = classifier.load_classifier("digits", progress=False)
        err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "warning" in err[0] and str(spec.path()) in err[0] and "retraining" in err[0], err
        assert again.sha256 == good.sha256  # retrained to the same weights
        assert torch.load(spec.path(), weights_only=True)["sha256"] == good.sha256  # and cached again
    # Weights changed behind the recorded hash: refused and retrained too.
    blob = torch.load(spec.path(), weights_only=True)
    next(iter(blob["state_dict"].values())).view(-1)[0] += 1.0
    torch.save(blob, spec.path())
    classifier._LOADED.clear()
    assert classifier.load_classifier("digits", progress=False).sha256 == good.sha256
    assert "do not match the sha256" in capfd.readouterr().err


def test_the_shipped_fashion_classifier_is_used_before_any_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path))
    monkeypatch.setattr(classifier, "_LOADED", {})
    spec = classifier.spec_of("fashion_mnist")
    shipped = classifier.shipped_path(spec)
    assert shipped is not None and shipped.parent.name == "weights"
    # A cached classifier of the same name (trained elsewhere: other weights) does not shadow it.
    other = spec.build_net()
    blob = {"version": 1, "seed": 0, "test_accuracy": 0.5, "sha256": None, "state_dict": other.state_dict()}
    torch.save(blob, spec.path())

    def no_training(*args, **kwargs):
        raise AssertionError("trained although a classifier ships")

    monkeypatch.setattr(classifier, "train_classifier", no_training)
    loaded = classifier.load_classifier("fashion_mnist", progress=False)
    assert loaded.path == shipped and loaded.sha256.startswith("9cb56d4cc20e")
    assert loaded.sha256 == classifier.weights_sha256(loaded.net.state_dict())
    assert "test acc 0.9123, sha256 9cb56d4cc20e" in loaded.implementation
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    feats, probs = loaded.features_and_probs(x)
    assert feats.shape == (4, spec.feature_dim) and torch.allclose(probs.sum(1).float(), torch.ones(4))


def test_an_unreadable_shipped_classifier_falls_back_to_the_cache_in_one_line(cache, net, tmp_path, monkeypatch, capfd):
    shipped_dir = tmp_path / "weights"
    shipped_dir.mkdir()
    spec = classifier.spec_of("digits")
    (shipped_dir / spec.file_name).write_bytes(b"not a checkpoint")
    monkeypatch.setattr(classifier, "SHIPPED_DIR", shipped_dir)
    monkeypatch.setattr(classifier, "_LOADED", {})
    capfd.readouterr()
    loaded = classifier.load_classifier("digits", progress=False)
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and str(shipped_dir / spec.file_name) in err[0] and "using the cache instead" in err[0], err
    assert loaded.path == spec.path() and loaded.sha256 == classifier.weights_sha256(net.state_dict())


def test_digits_fd_small_for_real_large_for_noise(net, split):
    x_train, _, x_test, _ = split
    fd = METRICS.build("digits_fd")
    real = fd(x_test, x_train)
    noise = fd(torch.rand_like(x_test) * 2 - 1, x_train)
    blurred = fd(x_test.roll(1, dims=-1), x_train)  # shifted digits: in between
    assert real < 0.05 * noise and real < blurred < noise
    assert fd(x_train, x_train) == pytest.approx(0.0, abs=1e-6)
    # 16x16 versions (the dataset's bilinear upsampling) are area-resized back to 8x8 for both sides.
    x16_test, x16_train = digits(split="test", image_size=16).x, digits(split="train", image_size=16).x
    assert fd(x16_test, x16_train) < 0.05 * noise


def test_frechet_distance_closed_form():
    # Diagonal Gaussians: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the standard deviations.
    mu1, mu2 = torch.tensor([0.0, 1.0]), torch.tensor([3.0, -1.0])
    s1, s2 = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    expected = (mu1 - mu2).square().sum() + (s1 - s2).square().sum()
    got = frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert got == pytest.approx(float(expected), rel=1e-9)


def test_digits_is_high_for_real_low_for_noise(net, split):
    _, _, x_test, _ = split
    score = METRICS.build("digits_is")
    real = score(x_test, None)
    noise = score(torch.rand(500, 1, 8, 8) * 2 - 1, None)
    one_class = score(x_test[split[3] == 3], None)
    assert 8.0 < real <= 10.0
    assert noise < 3.0 and one_class < 1.5


def test_digits_acc(net, split):
    _, _, x_test, y_test = split
    acc = METRICS.build("digits_acc")
    assert acc.needs_labels and not METRICS.build("digits_fd").needs_labels
    assert acc(x_test, None, labels=y_test) >= 0.97
    shuffled = y_test[torch.randperm(len(y_test), generator=torch.Generator().manual_seed(0))]
    assert abs(acc(x_test, None, labels=shuffled) - 0.1) < 0.05
    assert math.isnan(acc(x_test, None))  # unconditional: no requested class
    with pytest.raises(ValueError):
        acc(x_test, None, labels=y_test[:10])


# ------------------------------------------------------------------------------- torch-fidelity


@pytest.fixture(scope="module")
def images():
    """Digits as uint8 (N, 3, 8, 8), a split into two halves, and a noised copy."""
    x = digits().x[:400]
    g = torch.Generator().manual_seed(0)
    noised = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return fidelity.to_uint8_rgb(x), fidelity.to_uint8_rgb(noised)


def _fid(samples, reference, **kw):
    kw.setdefault("feature_extractor", RC)
    kw.setdefault("device", "cpu")
    return fidelity.fidelity_metrics(samples, kw.pop("num_samples", None), reference, ("fid",), **kw)["fid"]


def test_fid_real_torch_fidelity_path(cache, images):
    real, noised = images
    assert real.dtype == torch.uint8 and real.shape[1] == 3
    same = _fid(real, real)
    half = _fid(real[:200], real[200:])
    shifted = _fid(real.roll(2, dims=-1), real)
    noisy = _fid(noised, real)
    assert abs(same) < 1e-6
    assert 0 < half < noisy and half < shifted
    assert noisy > 3 * half
    # torch-fidelity's number matches our own Frechet distance on the extractor's features.
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    extractor = FEATURE_EXTRACTORS_REGISTRY[RC](RC, ["64"])
    with torch.no_grad():
        fa, fb = extractor(noised)[0], extractor(real)[0]
    ours = frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))
    assert noisy == pytest.approx(ours, rel=1e-3)


def test_registered_metrics_on_float_images(cache):
    x = digits().x[:400]
    noise = torch.rand(400, 1, 8, 8) * 2 - 1
    fid = METRICS.build("fid", feature_extractor=RC)
    assert fid.higher_is_better is False and "torch-fidelity" in fid.implementation and RC in fid.implementation
    assert abs(fid(x, x)) < 1e-6 and fid(noise, x) > 1.0
    kid = METRICS.build("kid", feature_extractor=RC, subsets=10)
    noisy_kid = kid(noise, x)
    assert noisy_kid > 0 and abs(kid(x[:200], x[200:])) < 0.05 * noisy_kid
    isc = METRICS.build("isc", feature_extractor=RC, splits=2)
    assert isc(x) >= 1.0 and "isc_std" in isc.last_results
    prc = METRICS.build("prc", feature_extractor=RC)
    assert prc(x, x) == pytest.approx(1.0)
    assert set(prc.last_results) == {"prc_precision", "prc_recall", "prc_f_score"}
    assert prc(noise, x) < 0.5
    with pytest.raises(ConfigError):
        METRICS.build("fid", bogus=1)


def test_generator_wrapper_is_batch_size_independent(cache, images):
    real, _ = images
    pool = digits().x

    def generator_fn(index):  # sample i: digit i, plus noise seeded by i
        noise = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(int(i))) for i in index])
        return (pool[index % len(pool)] + 0.3 * noise).clamp(-1, 1)

    cached = dict(cache_name="test-digits-400")  # reference statistics computed once, then read from the cache
    values = [_fid(generator_fn, real, num_samples=250, batch_size=b, **cached) for b in (7, 64, 250)]
    assert values[0] > 0 and max(values) - min(values) <= 1e-6 * values[0]
    ready = generator_fn(torch.arange(250))
    assert _fid(ready, real) == pytest.approx(values[0], rel=1e-6)
    assert list((cache / "fidelity_cache").glob("test-digits-400-*stat-fid*"))
    # Same through the registered Metric's streaming entry point.
    metric = METRICS.build("fid", feature_extractor=RC, batch_size=50, device="cpu")
    assert metric.from_generator(generator_fn, 250, real, **cached) == pytest.approx(values[0], rel=1e-6)

    # Noise mode: generator_fn gets torch-fidelity's N(0, I) noise (B, z_size).
    proj = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))

    def from_noise(z):
        return torch.tanh(z @ proj).reshape(-1, 1, 8, 8)

    noise_values = [_fid(from_noise, real, num_samples=120, batch_size=b, z_size=16, **cached) for b in (16, 120)]
    assert noise_values[0] == pytest.approx(noise_values[1], rel=1e-6)


def test_reference_cache_and_fid_stats_tool(cache, images, tmp_path):
    real, noised = images
    from PIL import Image

    folder = tmp_path / "ref"
    folder.mkdir()
    for i, img in enumerate(real[:200]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    spec = importlib.util.spec_from_file_location("fid_stats", ROOT / "tools" / "fid_stats.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tool.main([str(folder), "--feature-extractor", RC, "--out", str(tmp_path / "ref.npz"), "--device", "cpu"])
    stats = fidelity.load_stats_npz(out)
    assert stats["mu"].shape == (64,) and stats["sigma"].shape == (64, 64) and int(stats["num_images"]) == 200
    assert stats["feature_extractor"] == RC and int(stats["resolution"]) == 8
    from_folder = _fid(noised[:200], str(folder), cache_name="test-folder")
    assert list((cache / "fidelity_cache").glob("test-folder-*stat-fid*"))
    from_stats = _fid(noised[:200], out)
    assert from_stats == pytest.approx(from_folder, rel=1e-6)
    # Statistics made for another extractor are refused.
    np.savez(tmp_path / "other.npz", mu=stats["mu"], sigma=stats["sigma"], feature_extractor="inception-v3-compat")
    with pytest.raises(ConfigError, match="inception-v3-compat"):
        _fid(noised[:200], str(tmp_path / "other.npz"))
    # A onestep dataset by name, cached by dataset + resolution + extractor: the second call reads the cache.
    name = fidelity.reference_cache_name("digits", 8)
    first = _fid(noised, "digits")
    assert list((cache / "fidelity_cache").glob(f"{name}-{RC}-*"))
    assert _fid(noised, "digits") == pytest.approx(first, rel=1e-9)
    # The tool's default output path is the cache key.
    default = tool.main(["digits", "--feature-extractor", RC, "--device", "cpu", "--set", "split=test"])
    assert Path(default) == fidelity.default_stats_path("digits_test", 8, RC)


@pytest.fixture
def no_network(monkeypatch):
    """Any network attempt fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", forbidden)
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    monkeypatch.setattr(socket.socket, "connect", forbidden)


def test_missing_inception_weights_fail_fast(cache, no_network, monkeypatch, tmp_path):
    x = digits().x[:20]
    monkeypatch.setenv(fidelity.ENV_WEIGHTS, str(tmp_path / "missing.pth"))
    fid = METRICS.build("fid")

    def no_download(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(ConfigError) as info:  # refused before any download or network use
        fid(x, x)
    message = str(info.value)
    assert "\n" not in message and fidelity.ENV_WEIGHTS in message and "missing.pth" in message
    # Offline with an empty torch hub: refused without touching the network either.
    monkeypatch.delenv(fidelity.ENV_WEIGHTS)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(fidelity.ENV_OFFLINE, "1")
    with pytest.raises(ConfigError, match=fidelity.ENV_OFFLINE):
        fid(x, x)
    with pytest.raises(ConfigError, match="does not exist"):
        METRICS.build("fid", weights_path=str(tmp_path / "nope.pth"))(x, x)


def test_unreachable_network_fails_fast_without_download(cache, monkeypatch, tmp_path):
    x = digits().x[:20]
    monkeypatch.delenv(fidelity.ENV_WEIGHTS, raising=False)
    monkeypatch.delenv(fidelity.ENV_OFFLINE, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)

    def refused(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refused)
    with pytest.raises(ConfigError, match="unreachable"):
        METRICS.build("fid")(x, x)

    # A probe that hangs (e.g. in DNS) is abandoned after the probe timeout: the call is refused while
    # the probe is still blocked (it is released only afterwards), so no clock is read.
    import threading

    release, returned = threading.Event(), threading.Event()

    def hangs(*args, **kwargs):
        release.wait(HANG_GUARD_S)
        returned.set()
        raise OSError("too late")

    monkeypatch.setattr(socket, "create_connection", hangs)
    from onestep.eval.fidelity import weights

    monkeypatch.setattr(weights, "PROBE_TIMEOUT_S", 0.2)
    try:
        with pytest.raises(ConfigError, match="unreachable"):
            METRICS.build("fid")(x, x)
        assert not returned.is_set()  # abandoned, not waited for
    finally:
        release.set()
    with pytest.raises(ConfigError, match="one of"):
        METRICS.build("prc", component="bogus")


@pytest.mark.slow
def test_inception_runs_from_local_weights_file(cache, no_network, monkeypatch, tmp_path):
    """ONESTEP_INCEPTION_WEIGHTS reaches torch-fidelity's Inception (random weights written here;
    ~15 s on one CPU thread)."""
    fidelity.load_torch_fidelity()
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    cls = inception.FeatureExtractorInceptionV3
    with monkeypatch.context() as mp:  # build the architecture without loading weights
        mp.setattr(cls, "load_state_dict", lambda self, state: None)
        mp.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        state = cls("inception-v3-compat", ["2048"]).state_dict()
    torch.save(state, tmp_path / "inception.pth")
    monkeypatch.setenv(fidelity.ENV_WEIGHTS, str(tmp_path / "inception.pth"))
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    fid = METRICS.build("fid", device="cpu", batch_size=6)
    assert "inception.pth" in fid.implementation
    assert math.isfinite(fid(x, x.roll(1, dims=-1)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generator_wrapper_on_cuda_matches_cpu(cache, images):
    real, _ = images

    def generator_fn(index):
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(len(index), 1, 8, 8, generator=g)
        return (digits().x[index % 1797] + 0.3 * noise).clamp(-1, 1).cuda()

    cpu = _fid(generator_fn, real, num_samples=200, batch_size=50)
    gpu = _fid(generator_fn, real, num_samples=200, batch_size=50, device="cuda")
    assert gpu == pytest.approx(cpu, rel=1e-3)


def test_model_generator_fn_streams_the_eval_samples(cache, images):
    """generator_fn built from a model reproduces evaluate.generate's samples (seeded per index)."""
    from onestep.eval.generate import generate, model_generator_fn

    real, _ = images
    dataset = digits()
    torch.manual_seed(0)
    net = BACKBONES.build("test_dit", input_shape=(1, 8, 8), num_classes=10).eval()
    objective = OBJECTIVES.build("meanflow")
    samples, labels = generate(objective, net, dataset, num_samples=60, nfe=1, seed=3, batch_size=25, device="cpu")
    fn = model_generator_fn(objective, net, dataset, nfe=1, seed=3, device="cpu")
    assert torch.allclose(fn(torch.arange(60)), samples, atol=1e-5)
    streamed = _fid(fn, real, num_samples=60, batch_size=16)
    assert streamed == pytest.approx(_fid(samples, real), rel=1e-4)
