"""The logger protocol and the fan-out the training loop talks to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onestep.registry import LOGGERS, ConfigError
from onestep.utils.rundir import RunDir


class Logger:
    """Receives the training loop's rows (package docstring). ``open`` is called once, on rank 0,
    before the first row; the factory itself only validates options (so a recipe is checked before
    anything is opened)."""

    name = "logger"

    def open(self, run: RunDir, config: dict[str, Any], resumed: bool) -> None:
        pass

    def log_row(self, row: dict[str, float]) -> None:
        pass

    def log_metrics(self, rows: list[dict[str, Any]]) -> None:
        pass

    def log_image(self, tag: str, path: Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def logger_name(spec: str | dict[str, Any]) -> str:
    return spec if isinstance(spec, str) else str(spec.get("name"))


def build_logger(spec: str | dict[str, Any]) -> Logger:
    """A logger from a spec: a name or {name, **options}."""
    if not isinstance(spec, (str, dict)) or (isinstance(spec, dict) and "name" not in spec):
        raise ConfigError(f"train.loggers entries are names or {{name: ..., options}}; got {spec!r}")
    options = {} if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "name"}
    return LOGGERS.build(logger_name(spec), **options)


class Loggers(Logger):
    """All configured loggers behind one object (jsonl always first)."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def open(self, run, config, resumed):
        for logger in self.loggers:
            logger.open(run, config, resumed)

    def log_row(self, row):
        for logger in self.loggers:
            logger.log_row(row)

    def log_metrics(self, rows):
        for logger in self.loggers:
            logger.log_metrics(rows)

    def log_image(self, tag, path, step):
        for logger in self.loggers:
            logger.log_image(tag, path, step)

    def close(self):
        for logger in self.loggers:
            logger.close()


def open_loggers(specs: list, run: RunDir, config: dict[str, Any], resumed: bool) -> Loggers:
    """Build and open ``jsonl`` plus every logger in ``specs`` (a duplicate ``jsonl`` is ignored)."""
    names = [logger_name(s) for s in specs]
    specs = ["jsonl"] + [s for s, n in zip(specs, names) if n != "jsonl"]
    loggers = Loggers([build_logger(s) for s in specs])
    loggers.open(run, config, resumed)
    return loggers
