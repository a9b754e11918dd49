"""Evaluation: the metric protocol (``base``), sample-based metrics, the digits classifier metrics,
torch-fidelity metrics (``fidelity``), sample generation (``generate``) and the evaluator
(``evaluate``). Importing this package registers every metric in ``METRICS``."""
from onestep.eval import classifier, sample_metrics  # noqa: F401  (registers metrics)
from onestep.eval.fidelity import metrics as _fidelity_metrics  # noqa: F401  (registers fid, isc, kid, prc)
