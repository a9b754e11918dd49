"""FID / IS / KID / precision-recall the way the field computes them: through torch-fidelity's own
code path (``torch_fidelity.calculate_metrics``), with samples generated in batches straight into it.

- ``wrapper``: ``fidelity_metrics(generator_fn, num_samples, reference, metrics)``, the one call into
  torch-fidelity;
- ``metrics``: the registered ``fid``, ``isc``, ``kid``, ``prc`` metrics (streaming);
- ``references``: folders, datasets, ``.npz`` image batches and FID statistics, cache names;
- ``weights``: where extractor weights come from (local, hub cache, bounded download, offline);
- ``extractors``: torch-fidelity itself and the download-free ``onestep-random-conv`` extractor;
- ``images``: uint8 (N, 3, H, W) conversion.
"""

from onestep.eval.fidelity.extractors import DEFAULT_EXTRACTOR, RANDOM_CONV, feature_layer, load_torch_fidelity
from onestep.eval.fidelity.images import ImageTensorDataset, to_uint8_rgb
from onestep.eval.fidelity.metrics import FidelityMetric
from onestep.eval.fidelity.references import (
    default_stats_path,
    describe_reference,
    load_stats_npz,
    npz_images,
    reference_cache_name,
    reference_statistics,
    resolve_reference,
    save_stats_npz,
)
from onestep.eval.fidelity.weights import ENV_OFFLINE, ENV_WEIGHTS, resolve_weights
from onestep.eval.fidelity.wrapper import fidelity_metrics

__all__ = [
    "DEFAULT_EXTRACTOR",
    "RANDOM_CONV",
    "ENV_OFFLINE",
    "ENV_WEIGHTS",
    "FidelityMetric",
    "ImageTensorDataset",
    "default_stats_path",
    "describe_reference",
    "feature_layer",
    "fidelity_metrics",
    "load_stats_npz",
    "load_torch_fidelity",
    "npz_images",
    "reference_cache_name",
    "reference_statistics",
    "resolve_reference",
    "resolve_weights",
    "save_stats_npz",
    "to_uint8_rgb",
]
