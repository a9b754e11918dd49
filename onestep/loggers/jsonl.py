"""``jsonl``: stats.jsonl in the run directory, one JSON object per logged step (always on)."""

from __future__ import annotations

import json

from onestep.loggers.base import Logger
from onestep.registry import LOGGERS


class JsonlLogger(Logger):
    name = "jsonl"

    def __init__(self):
        self._file = None

    def open(self, run, config, resumed):
        run.path.mkdir(parents=True, exist_ok=True)
        self._file = open(run.stats_path, "a")

    def log_row(self, row):
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


@LOGGERS.register("jsonl")
def jsonl() -> JsonlLogger:
    """stats.jsonl in the run directory (always on; what compare and plot read)."""
    return JsonlLogger()
