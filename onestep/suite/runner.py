"""Running a suite: training, evaluations and grids as subprocesses of the CLI, in dependency order."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from onestep.registry import ConfigError
from onestep.suite.report import write_results
from onestep.suite.spec import EvalPass, Suite, SuiteRun, pass_sampler, trained_step
from onestep.utils.atomic import atomic_write
from onestep.utils.rundir import RunDir, read_jsonl


class Runner:
    def __init__(
        self, suite: Suite, jobs: int = 1, echo=print, threads: int | None = None, only: set[str] | None = None
    ):
        """``only``: the names of the runs to train and score (None: all); the report covers every run."""
        self.suite, self.jobs, self.echo = suite, max(1, jobs), echo
        self.selected = [r for r in suite.runs if only is None or r.name in only]
        cores = os.cpu_count() or 1
        self.threads = threads or max(1, cores // self.jobs)
        self.logs = suite.root / "logs"
        self._lock = threading.Lock()
        self.causes: dict[str, str] = {}
        self._procs: set[subprocess.Popen] = set()  # the commands running now
        self.stopped_by: int | None = None  # the signal that stopped the suite
        self._record_lock = threading.Lock()

    def record(self, event: str, **fields) -> None:
        """Append one dated row to ROOT/suite.jsonl, the suite's own log: each invocation's start (commit,
        jobs, threads, runs) and end, and every command's start and end. Its times give the suite's
        total wall time over all its invocations (``report.suite_wall_time``)."""
        row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pid": os.getpid(), "event": event}
        row.update(fields)
        try:
            with self._record_lock:
                self.suite.root.mkdir(parents=True, exist_ok=True)
                with open(self.suite.root / "suite.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
        except OSError as exc:  # the log is a record, not the work: a full disk must not stop a run
            self.echo(f"[suite] could not write {self.suite.root / 'suite.jsonl'}: {exc}")

    def _env(self) -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": str(self.threads)}

    def _call(self, name: str, what: str, cmd: list[str]) -> bool:
        """Run one CLI command, its output appended to ROOT/logs/NAME.WHAT.log; on failure the cause
        (the command's error line) goes to ``self.causes[name]`` and into the message."""
        if self.stopped_by is not None:  # stopped: nothing more starts (checked again under the lock)
            return False
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.{what}.log"
        t0 = time.perf_counter()
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            start = f.tell()  # the command's own output starts here
            with self._lock:  # no command starts once a signal has stopped the suite
                if self.stopped_by is not None:
                    return False
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self._env())
                self._procs.add(proc)
            self.echo(f"[suite] {name}: {what} started ({shlex.join(cmd[2:])})")
            try:
                self.record("command", run=name, what=what, status="started")
                rc = proc.wait()
            finally:
                with self._lock:
                    self._procs.discard(proc)
        minutes = (time.perf_counter() - t0) / 60
        status = "done" if rc == 0 else ("stopped" if self.stopped_by is not None else "failed")
        self.record("command", run=name, what=what, status=status, minutes=round(minutes, 2))
        if rc == 0:
            self.echo(f"[suite] {name}: {what} done in {minutes:.1f} min")
            return True
        if self.stopped_by is not None:  # the suite's signal stopped it: not a failure of the command
            self.echo(f"[suite] {name}: {what} stopped by {signal.Signals(self.stopped_by).name} ({minutes:.1f} min)")
            return False
        cause = failure_cause(log, start)
        with self._lock:
            self.causes[name] = f"{what}: {cause}" if cause else f"{what} exited with {rc}"
        self.echo(f"[suite] {name}: {what} FAILED in {minutes:.1f} min: {cause or f'exit {rc}'} (log: {log})")
        return False

    # -- one run ------------------------------------------------------------------------------
    def train(self, run: SuiteRun) -> bool:
        step = trained_step(run)
        base = [sys.executable, "-m", "onestep", "train"]
        if step is not None and step >= run.steps:
            return True
        kept = sorted(set(run.curve.steps) | set(run.curve.full_steps)) if run.curve else []
        keep = [f"train.keep_steps=[{','.join(str(k) for k in kept)}]"] if kept else []
        if step is not None:
            cmd = base + ["--resume", str(run.dir), "--no-progress", *keep, f"train.threads={self.threads}"]
        else:
            rd = RunDir(run.dir)
            if rd.leftovers():  # a start that never reached a checkpoint: keep it aside, start again
                aside = run.dir.with_name(run.dir.name + ".incomplete")
                if aside.exists():
                    import shutil

                    shutil.rmtree(aside)
                run.dir.rename(aside)
                self.echo(f"[suite] {run.name}: no checkpoint in {run.dir}; moved it to {aside}, starting again")
            cmd = base + [
                run.recipe,
                "--run-dir",
                str(run.dir),
                "--no-progress",
                *run.overrides,
                *keep,
                f"train.threads={self.threads}",
            ]
        return self._call(run.name, "train", cmd)

    def _missing(self, run: SuiteRun, step: int, e: EvalPass, num_samples: int) -> bool:
        """Whether metrics.jsonl lacks any row of pass ``e`` at ``step`` on ``num_samples`` samples (every
        metric the suite names; without a list, any row of each NFE)."""
        seed = self.suite.eval_seed(run)
        have = {
            (r.get("nfe"), r.get("metric"))
            for r in RunDir(run.dir).read_metrics()
            if r.get("step") == step
            and r.get("num_samples") == num_samples
            and r.get("seed") == seed
            and r.get("guidance") == e.guidance
            and (r.get("sampler") or "euler") == pass_sampler(run, e)
        }
        if self.suite.eval.get("metrics"):
            return any((nfe, m) not in have for nfe in e.nfe for m in self.suite.metric_names())
        return any(not any(n == nfe for n, _ in have) for nfe in e.nfe)

    def pending_evals(self, run: SuiteRun, late: bool) -> list[EvalPass]:
        step, n = trained_step(run), self.suite.num_samples(run)
        return [e for e in run.evals if e.late == late and self._missing(run, step, e, n)]

    def _eval_cmd(self, model: str, run: SuiteRun, e: EvalPass, num_samples: int) -> list[str]:
        cmd = [sys.executable, "-m", "onestep", "eval", model, "--num-samples", str(num_samples)]
        cmd += ["--seed", str(self.suite.eval_seed(run))]
        if self.suite.eval.get("metrics"):
            cmd += ["--metrics", ",".join(self.suite.metric_names())]
        for nfe in e.nfe:
            cmd += ["--nfe", str(nfe)]
        if e.guidance is not None:
            cmd += ["--guidance", repr(float(e.guidance))]  # exactly the value the rows are matched on
            interval = run.cfg.eval.guidance_interval
            if interval is not None:
                cmd += ["--guidance-interval", ",".join(repr(float(v)) for v in interval)]
        if e.sampler is not None:
            cmd += ["--sampler", e.sampler]
        if self.suite.eval.get("batch_size"):
            cmd += ["--batch-size", str(self.suite.eval["batch_size"])]
        return cmd

    def evaluate(self, run: SuiteRun, late: bool) -> bool:
        ok = True
        for e in self.pending_evals(run, late):
            cmd = self._eval_cmd(str(run.dir), run, e, self.suite.num_samples(run))
            ok = self._call(run.name, "eval" + ("_late" if late else ""), cmd) and ok
        return ok

    def evaluate_curve(self, run: SuiteRun) -> bool:
        """Score the run's kept checkpoints at its curve steps (and the full sample count at its
        ``full`` steps); what metrics.jsonl already has is not scored again."""
        if run.curve is None:
            return True
        ok, rd = True, RunDir(run.dir)
        jobs = [(k, run.curve.num_samples) for k in run.curve.steps]
        jobs += [(k, self.suite.num_samples(run)) for k in run.curve.full_steps if k != run.steps]
        for step, num_samples in jobs:
            todo = [e for e in run.curve.evals if self._missing(run, step, e, num_samples)]
            if not todo:
                continue
            ckpt = rd.last_checkpoint if step == trained_step(run) else rd.checkpoint_path(step)
            if not ckpt.is_file():
                self.echo(f"[suite] {run.name}: curve point at step {step}: no checkpoint {ckpt} (not kept)")
                continue
            for e in todo:
                ok = self._call(run.name, "curve", self._eval_cmd(str(ckpt), run, e, num_samples)) and ok
        return ok

    def run_one(self, run: SuiteRun) -> None:
        try:
            for dep in run.after:
                other = self.by_name[dep]
                other.done.wait()
                if other.status != "trained":
                    run.status, run.error = "skipped", f"its dependency '{dep}' did not train"
                    self.echo(f"[suite] {run.name}: skipped ({run.error})")
                    return
            if not self.train(run):
                run.status, run.error = "failed", self.causes.get(run.name, "training failed")
                return
            run.status = "trained"
        finally:
            run.done.set()
        if not self.evaluate(run, late=False):
            run.error = self.causes.get(run.name, "an evaluation failed")
        if not self.evaluate_curve(run):
            run.error = self.causes.get(run.name, "a curve evaluation failed")
        self.grid(run)

    def grid(self, run: SuiteRun) -> None:
        from onestep.suite.grids import class_grid

        path = self.suite.root / "grids" / f"{run.name}.png"
        step = trained_step(run)
        if (
            path.is_file()
            and path.with_suffix(".step").is_file()
            and path.with_suffix(".step").read_text() == str(step)
        ):
            return
        try:
            class_grid(run.dir, path, per_class=10, nfe=run.grid.nfe[0], guidance=run.grid.guidance)
            atomic_write(path.with_suffix(".step"), lambda f: f.write(str(step).encode()))
        except (ConfigError, OSError, ValueError, RuntimeError) as exc:
            self.echo(f"[suite] {run.name}: grid failed: {exc}")

    def run(self) -> int:
        self.by_name = {r.name: r for r in self.selected}
        t0 = time.perf_counter()
        with RunDir(self.suite.root).lock(), self._stop_on_signals():
            from onestep.utils.version import source_commit

            self.record(
                "start",
                commit=source_commit(),
                jobs=self.jobs,
                threads=self.threads,
                runs=[r.name for r in self.selected],
            )
            with ThreadPoolExecutor(self.jobs) as pool:
                list(pool.map(self.run_one, self._ordered()))
            if self.stopped_by is not None:
                return self._stopped(t0)
            with ThreadPoolExecutor(self.jobs) as pool:
                list(
                    pool.map(lambda r: self.evaluate(r, late=True), [r for r in self.selected if r.status == "trained"])
                )
            if self.stopped_by is not None:
                return self._stopped(t0)
            self.real_rows()
            failed = [r for r in self.selected if r.status != "trained"]
            self.record("end", wall_s=round(time.perf_counter() - t0), failed=[r.name for r in failed])
            write_results(self.suite, echo=self.echo)
        self.echo(
            f"[suite] {len(self.selected) - len(failed)} of {len(self.selected)} runs trained; "
            f"wall time {(time.perf_counter() - t0) / 60:.1f} min; results in {self.suite.root / 'results.md'}"
        )
        for r in failed:
            self.echo(f"[suite] {r.name}: {r.status}: {r.error}")
        for r in self.selected:
            if r.status == "trained" and r.error:
                self.echo(f"[suite] {r.name}: trained, but {r.error}")
        return 0 if not failed else 1

    def _stopped(self, t0: float) -> int:
        """A signal stopped the suite: record it, say how to resume, and give 128 + the signal."""
        by = signal.Signals(self.stopped_by).name
        self.record("stopped", signal=by, wall_s=round(time.perf_counter() - t0))
        self.echo(
            f"[suite] stopped by {by}: its commands were stopped "
            f"(a training saves a checkpoint); run the same `onestep suite` to resume"
        )
        return 128 + self.stopped_by

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While the suite runs, SIGTERM or SIGINT stops it: the signal goes on to every running command
        (training saves a checkpoint and exits), no new command starts, and ``run`` returns 128 + the
        signal. Without this a killed suite would leave its commands running, orphaned."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum, frame):
            with self._lock:
                self.stopped_by = signum
                procs = list(self._procs)
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _ordered(self) -> list[SuiteRun]:
        """Runs in an order where each comes after its dependencies (the pool takes them in order, so
        a job never waits on a run that has not started)."""
        out, seen = [], set()

        def visit(r: SuiteRun, stack: tuple[str, ...]) -> None:
            if r.name in seen:
                return
            if r.name in stack:
                raise ConfigError(f"suite: runs depend on each other in a cycle ({' -> '.join(stack + (r.name,))})")
            for dep in r.after:
                visit(self.by_name[dep], stack + (r.name,))
            seen.add(r.name)
            out.append(r)

        for r in self.selected:
            visit(r, ())
        return out

    def real_rows(self) -> list[dict]:
        """Rows for real images of each ``real`` split (cached in ROOT/real.jsonl)."""
        cache = self.suite.root / "real.jsonl"
        rows = read_jsonl(cache)
        want = [s for s in self.suite.real if not any(r.get("weights") == f"real:{s}" for r in rows)]
        if want and self.suite.runs:
            from onestep.build import build_dataset
            from onestep.eval.evaluate import evaluate_real

            dataset = build_dataset(self.suite.runs[0].cfg)
            for split in want:
                rows += evaluate_real(
                    dataset,
                    split=split,
                    metrics=self.suite.metric_names(),
                    num_samples=self.suite.num_samples(self.suite.runs[0]),
                    seed=int(self.suite.eval.get("seed", 0)),
                )
            atomic_write(cache, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
        return rows


def failure_cause(log, start: int = 0) -> str:
    """The line that says why a CLI command failed, from the part of ``log`` it wrote (after byte
    ``start``): its "onestep ...: error/stopped" line, else the last line of a traceback."""
    try:
        with open(log, "rb") as f:
            f.seek(start)
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("onestep ") and (": error:" in line or ": stopped:" in line):
            return line
    return lines[-1][:300] if lines else ""
