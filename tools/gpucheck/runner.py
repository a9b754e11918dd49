"""The parent side: ``Runner`` runs each part in its own worker subprocess within its timeout and the
budget, and rewrites ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` after each part."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .bench import TARGET_MEM_RATIO, TARGET_TIME_RATIO
from .numerics import TOLERANCES
from .parts import DEFAULT_TIMEOUTS, MIN_SECONDS, PARTS
from .procs import ROOT, TOOL, kill_group, now_iso, read_text, run_process, tail, write_atomic
from .report import render


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="onestep_gpu_check_"))
        self.t0 = time.monotonic()
        self.current: subprocess.Popen | None = None
        self.report = {
            "tool": "tools/gpu_check.py",
            "version": 1,
            "device": args.device,
            "tiny": args.tiny,
            "budget_s": args.budget_s,
            "started": now_iso(),
            "finished": None,
            "elapsed_s": 0.0,
            "argv": sys.argv[1:],
            "targets": {"time_ratio_max": TARGET_TIME_RATIO, "mem_ratio_max": TARGET_MEM_RATIO},
            "tolerances": TOLERANCES,
            "parts": {p: {"status": "pending"} for p in PARTS if p in args.parts},
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        write_atomic(self.out / "gpu_check.json", json.dumps(self.report, indent=1, default=str))
        write_atomic(self.out / "gpu_check.md", render(self.report))

    def run(self) -> int:
        self.save()
        try:
            for part in self.report["parts"]:
                try:
                    self.run_part(part)
                except Exception:  # noqa: BLE001 - a bug here must not cost the other parts
                    rec = self.report["parts"][part]
                    rec["status"], rec["error"] = "failed", "gpu_check internal error:\n" + tail(traceback.format_exc())
                self.save()
        except KeyboardInterrupt:
            for rec in self.report["parts"].values():
                if rec["status"] == "running":
                    rec["status"], rec["error"] = "interrupted", "gpu_check.py was interrupted during this part"
                elif rec["status"] == "pending":
                    rec["status"], rec["reason"] = "skipped", "gpu_check.py was interrupted before this part"
        finally:
            self.report["finished"] = now_iso()
            self.save()
            import shutil

            shutil.rmtree(self.work, ignore_errors=True)
        print(render(self.report))
        print(f"wrote {self.out / 'gpu_check.json'} and {self.out / 'gpu_check.md'}")
        return 0

    def run_part(self, part: str) -> None:
        rec = self.report["parts"][part]
        left = self.args.budget_s - self.elapsed()
        if left < MIN_SECONDS[part]:
            rec.update(
                status="skipped",
                reason=f"budget: {left:.0f} s left of {self.args.budget_s} s, "
                f"this part needs at least {MIN_SECONDS[part]} s",
            )
            return
        timeout = min(self.args.timeouts.get(part, DEFAULT_TIMEOUTS[part] * self.args.timeout_scale), left)
        result_file, children = self.work / f"{part}.result.json", self.work / f"{part}.children"
        env_info = (self.report["parts"].get("environment", {}).get("result") or {}).get("info")
        spec = {
            "part": part,
            "device": self.args.device,
            "tiny": self.args.tiny,
            "deadline": time.time() + timeout,
            "work_dir": str(self.work),
            "result_file": str(result_file),
            "children_file": str(children),
            "fail": self.args.fail.get(part),
            "nproc": self.args.nproc,
            "timeout_scale": self.args.timeout_scale,
            "keep_runs": self.args.keep_runs,
            "context": {"environment": env_info},
        }
        spec_file = self.work / f"{part}.spec.json"
        spec_file.write_text(json.dumps(spec))
        rec.update(status="running", started=now_iso(), timeout_s=round(timeout, 1))
        self.save()
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",  # this checkout's onestep in every subprocess
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        # the worker gets a few seconds past its own deadline to write up before it is killed
        try:
            out = run_process(
                [sys.executable, str(TOOL), "--_worker", part, "--_spec", str(spec_file)],
                timeout + 3,
                env=env,
                log_dir=self.work,
                name=f"part_{part}",
            )
        finally:  # whatever the worker started and left running when it was killed
            started = [int(x) for x in read_text(children).split() if x.lstrip("-").isdigit()]
            for pid in {p for p in started if p > 0} - {-p for p in started if p < 0}:
                kill_group(pid, grace=2.0)
        result = {}
        with contextlib.suppress(OSError, json.JSONDecodeError):
            result = json.loads(result_file.read_text())
        rec.update(wall_s=out["wall_s"], returncode=out["rc"], result=result)
        if out["timed_out"]:
            rec["status"] = "timeout"
            rec["error"] = f"timed out after {timeout:.0f} s" + (
                f"; stderr tail:\n{tail(out['stderr'], 10)}" if out["stderr"].strip() else ""
            )
        elif out["rc"] != 0:
            rec["status"] = "failed"
            rec["error"] = f"exit code {out['rc']}:\n{tail(out['stderr'])}"
        else:
            rec["status"] = result.get("status", "failed")
            if rec["status"] == "running":  # exited 0 without finishing: should not happen
                rec["status"] = "failed"
            if result.get("error"):
                rec["error"] = result["error"]
