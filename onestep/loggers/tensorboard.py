"""``tensorboard``: an event file under RUN/tensorboard (needs the ``tensorboard`` package:
``pip install "onestep[tensorboard]"``). Training rows become scalars under their own names,
evaluation rows ``eval/<metric>@<nfe>`` at their step, previews images."""

from __future__ import annotations

import numpy as np

from onestep.loggers.base import Logger
from onestep.registry import LOGGERS, ConfigError

SKIP = ("step",)


class TensorBoardLogger(Logger):
    name = "tensorboard"

    def __init__(self, flush_secs: int = 30, subdir: str = "tensorboard"):
        self.flush_secs, self.subdir = flush_secs, subdir
        self.writer = None

    def open(self, run, config, resumed):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "train.loggers: 'tensorboard' needs the tensorboard package; "
                'pip install "onestep[tensorboard]" (or remove it from train.loggers)'
            ) from None
        self.writer = SummaryWriter(log_dir=str(run.path / self.subdir), flush_secs=self.flush_secs)

    def log_row(self, row):
        step = int(row["step"])
        for key, value in row.items():
            if key not in SKIP and isinstance(value, (int, float)):
                self.writer.add_scalar(key, float(value), step)

    def log_metrics(self, rows):
        for r in rows:
            self.writer.add_scalar(f"eval/{r['metric']}@{r['nfe']}", float(r["value"]), int(r["step"]))
        self.writer.flush()

    def log_image(self, tag, path, step):
        from PIL import Image

        image = np.asarray(Image.open(path).convert("RGB"))
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@LOGGERS.register("tensorboard")
def tensorboard(flush_secs: int = 30, subdir: str = "tensorboard") -> TensorBoardLogger:
    """TensorBoard event files in RUN/<subdir> (the tensorboard extra)."""
    if flush_secs < 1:
        raise ConfigError(f"logger 'tensorboard': flush_secs must be >= 1, got {flush_secs}")
    return TensorBoardLogger(flush_secs, subdir)
