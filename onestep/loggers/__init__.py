"""Training loggers, registered in ``LOGGERS`` and chosen with ``train.loggers``.

Every logger gets the same rows: ``log_row(row)`` with one training-stats row per logged step (``step``,
``loss`` the total, ``loss_main`` the objective, ``loss_<regularizer>`` each regularizer's unweighted
value, the objective's diagnostics, ``grad_norm``, ``lr``, ``steps_per_s``, ...), ``log_metrics(rows)``
with the evaluation rows that go to metrics.jsonl, ``log_image(tag, path, step)`` with preview pictures,
and ``close()``. ``jsonl`` (stats.jsonl in the run directory) is always on: it is the run's own record
that ``onestep compare`` and ``onestep plot`` read. ``tensorboard`` and ``wandb`` are optional extras
(``pip install "onestep[tensorboard]"``, ``"onestep[wandb]"``); wandb honours ``WANDB_MODE=offline``.
"""

from onestep.loggers import base, jsonl, tensorboard, wandb  # noqa: F401  (registers the loggers)
from onestep.loggers.base import Logger, open_loggers

__all__ = ["Logger", "open_loggers"]
