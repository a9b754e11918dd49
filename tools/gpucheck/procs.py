"""Process control and small stdlib helpers shared by the parent and the workers: the checkout's
paths, running a command in its own session with a timeout (``run_process``, ``kill_group``),
atomic writes, output tails and JSON lines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
TOOL = ROOT / "tools" / "gpu_check.py"  # the entry point: workers and torchrun re-invoke it
sys.path.insert(0, str(ROOT))  # workers import this checkout's onestep, whatever is installed
BENCH = ROOT / "tools" / "bench.py"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tail(text: str, lines: int = 25, chars: int = 4000) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(pid: int, grace: float = 5.0, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group led by ``pid`` (a process this tool started with its own session),
    wait up to ``grace`` seconds for the leader (``proc``, reaped here) or the group to go, then
    SIGKILL whatever is left of the group."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    else:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_process(
    cmd: list[str],
    timeout: float,
    *,
    cwd: Path = ROOT,
    env: dict | None = None,
    log_dir: Path,
    name: str,
    children_file: Path | None = None,
) -> dict:
    """Run ``cmd`` in its own session with a timeout (killing its whole process group on expiry).

    stdout/stderr go to files (no pipe to fill up); returns rc (None on timeout), timed_out, wall_s,
    stdout, stderr. ``children_file`` gets the pid when it starts and -pid once it is gone, so
    whoever kills us can kill what we left running.
    """
    out_path, err_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    t0 = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
        )
        if children_file is not None:
            with open(children_file, "a") as f:
                f.write(f"{proc.pid}\n")
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(proc.pid, proc=proc)
            proc.wait()
            rc, timed_out = None, True
        finally:
            if proc.poll() is None:  # interrupted while waiting
                kill_group(proc.pid, grace=2.0, proc=proc)
        # Leftovers of the group (e.g. torchrun workers) after a normal exit.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if children_file is not None:
            with open(children_file, "a") as f:
                f.write(f"-{proc.pid}\n")  # done: nothing of this group is left to kill
    return {
        "rc": rc,
        "timed_out": timed_out,
        "wall_s": round(time.monotonic() - t0, 2),
        "stdout": read_text(out_path),
        "stderr": read_text(err_path),
    }


def failure_tail(stderr: str, lines: int = 15) -> str:
    """The informative end of a failed command's stderr: for torchrun, what the workers printed
    before the launcher's own report (which starts at its "failed (exitcode" line)."""
    kept = stderr.splitlines()
    cut = next((i for i, line in enumerate(kept) if "failed (exitcode" in line), None)
    if cut:
        kept = kept[:cut]
    return tail("\n".join(kept), lines)


def json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows
