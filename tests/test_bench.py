"""tools/bench.py runs and reports the documented fields (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import HANG_GUARD_S

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench.py"


def test_bench_json_rows():
    out = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--backbones",
            "test_dit",
            "--objectives",
            "flow_matching,meanflow",
            "--batch",
            "4",
            "--input-shape",
            "4,8,8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--json",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["objective"] for r in rows] == ["flow_matching", "meanflow"]
    for r in rows:
        assert {"backbone", "objective", "batch", "ms_per_step", "peak_mem_mb", "ratio_to_flow_matching"} <= set(r)
        assert r["backbone"] == "test_dit" and r["batch"] == 4 and r["ms_per_step"] > 0
    assert rows[0]["ratio_to_flow_matching"] == 1.0
    if sys.platform.startswith("linux"):  # CPU peak memory from the resident set
        assert all(r["peak_mem_mb"] > 0 for r in rows) and rows[0]["mem_ratio_to_flow_matching"] == 1.0
        assert rows[1]["mem_ratio_to_flow_matching"] > 0


def test_bench_timing_only_rows_and_objective_settings():
    out = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--backbones",
            "test_mlp",
            "--input-shape",
            "2",
            "--batch",
            "64",
            "--objectives",
            "flow_matching;meanflow:velocity_estimate=batch_posterior,ratio_r_neq_t=0.5",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--json",
            "--threads",
            "1",
            "--no-cpu-memory",
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["objective"] for r in rows] == [
        "flow_matching",
        "meanflow:velocity_estimate=batch_posterior,ratio_r_neq_t=0.5",
    ]
    assert all(r["peak_mem_mb"] is None and r["ms_per_step"] > 0 for r in rows)


def test_bench_improved_meanflow_with_backbone_kwargs():
    out = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--backbones",
            "test_mlp",
            "--input-shape",
            "2",
            "--batch",
            "16",
            "--objectives",
            "flow_matching,improved_meanflow",
            "--num-classes",
            "3",
            "--backbone-kwargs",
            '{"test_mlp": {"guidance_conditions": true}}',
            "--steps",
            "1",
            "--warmup",
            "1",
            "--json",
            "--threads",
            "1",
            "--no-cpu-memory",
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["objective"] for r in rows] == ["flow_matching", "improved_meanflow"]
    assert rows[1]["ms_per_step"] > 0 and rows[1]["ratio_to_flow_matching"] > 0


def test_bench_distillation_row_with_a_copied_teacher():
    """'teacher=copy' times a distillation objective (sCD) against a frozen copy of the backbone."""
    out = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--backbones",
            "test_mlp",
            "--input-shape",
            "2",
            "--batch",
            "16",
            "--objectives",
            "flow_matching;scm;scm:mode=scd,teacher=copy",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--json",
            "--threads",
            "1",
            "--no-cpu-memory",
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["objective"] for r in rows] == ["flow_matching", "scm", "scm:mode=scd,teacher=copy"]
    assert all(r["ms_per_step"] > 0 and r["ratio_to_flow_matching"] > 0 for r in rows)


CHECK_PEAK = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("bench_tool", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
assert bench.cpu_peak_tracking()
memory = bench.PeakMemory(torch.device("cpu"), True)
held = torch.ones(25 * 2**18)  # 25 MiB allocated before start(): not counted
peaks = []
for mib in (80, 20):
    memory.start()
    a = torch.ones(mib * 2**18)
    b = a * 2  # two live buffers of mib MiB at the peak
    del a, b
    peaks.append(memory.stop())
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory reads Linux procfs")
def test_cpu_peak_memory_follows_live_tensors():
    """The CPU peak counts what a step allocates above what was held at start(), and frees return
    memory (a later, smaller step is not charged for an earlier, larger one). In a subprocess: the
    tool changes malloc settings process-wide."""
    out = subprocess.run(
        [sys.executable, "-c", CHECK_PEAK, str(TOOL)], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    for mib, peak in zip((80, 20), peaks):
        assert 2 * mib - 2 < peak < 2 * mib + 12, (mib, peak)


def test_rounds_report_median_and_spread():
    out = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--backbones",
            "test_mlp",
            "--input-shape",
            "2",
            "--batch",
            "32",
            "--objectives",
            "flow_matching,meanflow",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--rounds",
            "3",
            "--json",
            "--threads",
            "1",
            "--no-cpu-memory",
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    fm, mf = rows
    for r in rows:
        assert r["rounds"] == 3 and len(r["ms_per_step_rounds"]) == 3
        lo, hi = r["ms_range"]
        assert lo <= r["ms_per_step"] <= hi and sorted(r["ms_per_step_rounds"])[1] == r["ms_per_step"]
    assert fm["ratio_rounds"] == [1.0, 1.0, 1.0] and fm["ratio_to_flow_matching"] == 1.0
    lo, hi = mf["ratio_range"]
    assert lo <= mf["ratio_to_flow_matching"] <= hi and len(mf["ratio_rounds"]) == 3
