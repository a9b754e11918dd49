"""The run directory: the one module that knows its layout.

    RUN/config.yaml        the resolved recipe + meta (versions, argv, parameter count)
    RUN/stats.jsonl        one row per logged training step
    RUN/metrics.jsonl      one row per (step, nfe, metric) of ``onestep eval`` / periodic eval
    RUN/samples/           preview pictures, step_NNNNNNNNN_nfe1.png
    RUN/checkpoints/       last.pt and step_NNNNNNNNN.pt
    RUN/.lock              the PID of the process writing the run (``RunDir.lock``)

Train, sample, eval, compare and plot go through ``RunDir``; nothing else spells these names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from onestep.registry import ConfigError
from onestep.utils import yamlio
from onestep.utils.atomic import atomic_write
from onestep.utils.checkpoint import FORMAT, atomic_save, read_checkpoint_file

_NUMBERED = re.compile(r"^step_(\d+)\.pt$")


class RunDir:
    CONFIG = "config.yaml"
    STATS = "stats.jsonl"
    METRICS = "metrics.jsonl"
    ENVIRONMENT = "environment.jsonl"
    SAMPLES = "samples"
    CHECKPOINTS = "checkpoints"
    LAST = "last.pt"
    LOCK = ".lock"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # -- paths ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def stats_path(self) -> Path:
        return self.path / self.STATS

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def environment_path(self) -> Path:
        return self.path / self.ENVIRONMENT

    @property
    def samples_dir(self) -> Path:
        return self.path / self.SAMPLES

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints_dir / self.LAST

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step:09d}.pt"

    def preview_path(self, step: int, nfe: int = 1) -> Path:
        return self.samples_dir / f"step_{step:09d}_nfe{nfe}.png"

    # -- what is there --------------------------------------------------------------------------
    def is_run(self) -> bool:
        """A run directory: it has a config.yaml."""
        return self.config_path.is_file()

    def leftovers(self) -> list[str]:
        """Files of an earlier run that a new run would overwrite or mix with (empty for a fresh dir)."""
        found = [p.name for p in (self.config_path, self.stats_path, self.metrics_path) if p.exists()]
        if self.numbered_checkpoints() or self.last_checkpoint.exists():
            found.append(self.CHECKPOINTS + "/")
        return found

    def numbered_checkpoints(self) -> list[Path]:
        """step_*.pt, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints_dir.iterdir() if (m := _NUMBERED.match(p.name))]
        return [p for _, p in sorted(found)]

    def save_checkpoint(
        self, state: dict[str, Any], *, numbered: bool, keep: int = 0, protected: Iterable[int] = ()
    ) -> Path:
        """Write ``last.pt`` (and a numbered copy), atomically; keep only the ``keep`` newest numbered
        ones (0 = all) besides those at the ``protected`` steps, which are never removed."""
        state = {"format": FORMAT, **state}
        if numbered:
            atomic_save(state, self.checkpoint_path(state["step"]))
        atomic_save(state, self.last_checkpoint)
        if keep > 0:
            kept = {self.checkpoint_path(s).name for s in protected}
            rotating = [p for p in self.numbered_checkpoints() if p.name not in kept]
            for old in rotating[:-keep]:
                old.unlink(missing_ok=True)
        return self.last_checkpoint

    # -- config ---------------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        try:
            raw = yamlio.safe_load(self.config_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.path} is not a run directory (no {self.CONFIG})") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{self.config_path}: not a run's config.yaml (invalid YAML: {first})") from None
        # Every run writes all sections (meta last), so a truncated file lacks at least ``seed``.
        sections = ("data", "backbone", "objective", "train", "eval", "seed")
        if not isinstance(raw, dict):
            missing = list(sections)
        else:
            missing = [k for k in sections if k not in raw or (k != "seed" and not isinstance(raw[k], dict))]
        if missing:
            raise ConfigError(
                f"{self.config_path}: not a run's config.yaml (no {', '.join(missing)} section; a run writes "
                f"data, backbone, objective, train, eval and seed; truncated?)"
            )
        return raw

    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config_path, yamlio.safe_dump(config))

    # -- rows -----------------------------------------------------------------------------------
    def read_stats(self) -> list[dict[str, Any]]:
        return read_jsonl(self.stats_path)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        self._append_rows(self.metrics_path, rows)

    def read_environments(self) -> list[dict[str, Any]]:
        """One row per training start or resume: {"step": the step it started from, "time", **environment}."""
        return read_jsonl(self.environment_path)

    def append_environment(self, row: dict[str, Any]) -> None:
        self._append_rows(self.environment_path, [row])

    def _append_rows(self, path: Path, rows: list[dict[str, Any]]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def truncate_stats(self, after_step: int) -> int:
        """Drop stats rows with step > ``after_step`` (rows a killed run wrote past its last checkpoint;
        a resumed run writes them again), atomically. Returns how many rows were dropped."""
        if not self.stats_path.exists():
            return 0
        lines = self.stats_path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if int(row.get("step", 0)) <= after_step:
                keep.append(line)
        dropped = len(lines) - len(keep)
        if dropped:
            write_text_atomic(self.stats_path, "".join(line + "\n" for line in keep))
        return dropped

    # -- writer lock ----------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold RUN/.lock (this process's PID) while writing the run; a second writer is refused with
        a ConfigError naming the holder's PID; a lock left by a dead process is taken over."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / self.LOCK
        if _read_pid(path) == os.getpid():  # already ours (re-entrant): the outer holder releases it
            yield
            return
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_pid(path)
                if holder is not None and holder != os.getpid() and _alive(holder):
                    raise ConfigError(
                        f"{self.path} is being written by another process (PID {holder}); "
                        f"wait for it or pick another --run-dir"
                    ) from None
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            break
        else:
            raise ConfigError(f"cannot take the lock {path}")
        try:
            yield
        finally:
            if _read_pid(path) == os.getpid():
                path.unlink(missing_ok=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (-> checkpoints/last.pt) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        cand = RunDir(path).last_checkpoint
        if not cand.is_file():
            raise ConfigError(f"no checkpoint in run directory {path} (expected {cand})")
        return cand
    if not path.is_file():
        raise ConfigError(f"checkpoint or run directory not found: {path}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """An onestep checkpoint from a run directory (its last.pt) or a checkpoint file."""
    return read_checkpoint_file(resolve_checkpoint(path), map_location)


def run_of_checkpoint(checkpoint: str | Path) -> RunDir | None:
    """The run directory a checkpoint file belongs to (RUN/checkpoints/x.pt -> RUN), if it is one."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name != RunDir.CHECKPOINTS:
        return None
    run = RunDir(checkpoint.parent.parent)
    return run if run.is_run() else None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl file ([] when missing); a line cut short by a kill is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_text_atomic(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
