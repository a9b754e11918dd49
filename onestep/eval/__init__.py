"""Evaluation: the metric protocol (``base``), sample-based metrics, the reference-classifier metrics (``classifiers``),
torch-fidelity metrics (``fidelity``), sample generation (``generate``) and the evaluator
(``evaluate``). Importing this package registers every metric in ``METRICS``."""

from onestep.eval import classifiers, sample_metrics  # noqa: F401  (registers metrics)
from onestep.eval.fidelity import metrics as _fidelity_metrics  # noqa: F401  (registers fid, isc, kid, prc)
