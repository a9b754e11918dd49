"""torch-fidelity, imported once (lazily: it pulls in torchvision), and the download-free test
feature extractor ``onestep-random-conv``."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from onestep.registry import ConfigError

RANDOM_CONV = "onestep-random-conv"
DEFAULT_EXTRACTOR = "inception-v3-compat"

_TF = None  # torch_fidelity module, imported lazily (it pulls in torchvision: ~4 s)


def load_torch_fidelity():
    """Import torch-fidelity once and register ``onestep-random-conv``."""
    global _TF
    if _TF is None:
        import torch_fidelity
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        if RANDOM_CONV not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(RANDOM_CONV, _random_conv_class(torch_fidelity))
        _TF = torch_fidelity
    return _TF


def device_context(device):
    device = torch.device(device)
    if device.type == "cuda":
        return True, (torch.cuda.device(device) if device.index is not None else nullcontext())
    if device.type != "cpu":
        raise ConfigError(f"torch-fidelity runs on 'cpu' or 'cuda', got device '{device}'")
    return False, nullcontext()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _raised_byload_torch_fidelity(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "torch_fidelity" in tb.tb_frame.f_code.co_filename


def tf_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch-fidelity")
    except Exception:  # pragma: no cover
        return "?"


def feature_layer(feature_extractor: str, metric: str) -> str:
    """The extractor's default feature layer for ``metric`` (torch-fidelity's choice)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    load_torch_fidelity()
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ConfigError(
            f"unknown feature extractor '{feature_extractor}'; known: {', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}"
        )
    return FEATURE_EXTRACTORS_REGISTRY[feature_extractor].get_default_feature_layer_for_metric(metric)


# ------------------------------------------------------------------------- test feature extractor


def _random_conv_class(tf):
    from torch_fidelity.helpers import vassert

    class RandomConvFeatureExtractor(tf.FeatureExtractorBase):
        """Download-free extractor for tests and smoke runs ("onestep-random-conv v1, seed 0").

        uint8 (B, 3, H, W) -> bilinear resize to 16x16 -> (x - 128) / 128 -> three 3x3 convs with
        fixed He-scaled Gaussian weights from seed 0 (3->32 s1, 32->64 s2, 64->64 s2, ReLU) ->
        global mean, times 8 -> feature "64" (B, 64) (FID / KID / PRC); a fixed random linear map
        of it gives "logits_unbiased" (B, 10) (ISC). Not a perceptual metric: its numbers mean nothing across
        extractors and serve only to exercise torch-fidelity's real code path.
        """

        INPUT_SIZE = 16
        SEED = 0
        FEATURE_SCALE = 8.0  # features ~ 1.8 +- 0.4 on digits

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(self.SEED)

            def conv(cin, cout, stride):
                layer = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
                with torch.no_grad():
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * math.sqrt(2.0 / (cin * 9)))
                    layer.bias.zero_()
                return layer

            self.convs = torch.nn.ModuleList([conv(3, 32, 1), conv(32, 64, 2), conv(64, 64, 2)])
            self.head = torch.nn.Linear(64, 10)
            with torch.no_grad():
                self.head.weight.copy_(torch.randn(10, 64, generator=g) / 2.0)
                self.head.bias.zero_()
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return "64", "logits_unbiased"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits_unbiased", "fid": "64", "kid": "64", "prc": "64"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x):
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting uint8 images")
            vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {tuple(x.shape)}")
            h = x.float()
            if h.shape[-2:] != (self.INPUT_SIZE, self.INPUT_SIZE):
                h = F.interpolate(h, size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", align_corners=False)
            h = (h - 128.0) / 128.0
            for layer in self.convs:
                h = F.relu(layer(h))
            feat = h.mean(dim=(2, 3)) * self.FEATURE_SCALE
            out = {"64": feat, "logits_unbiased": self.head(feat)}
            return tuple(out[k] for k in self.features_list)

    return RandomConvFeatureExtractor
