"""tools/bench.py runs and reports the documented fields (no timing assertions)."""
import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench.py"


def test_bench_json_rows():
    out = subprocess.run([sys.executable, str(TOOL), "--backbones", "test_dit", "--objectives", "flow_matching,meanflow",
                          "--batch", "4", "--input-shape", "4,8,8", "--steps", "2", "--warmup", "1", "--json",
                          "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["objective"] for r in rows] == ["flow_matching", "meanflow"]
    for r in rows:
        assert {"backbone", "objective", "batch", "ms_per_step", "peak_mem_mb", "ratio_to_flow_matching"} <= set(r)
        assert r["backbone"] == "test_dit" and r["batch"] == 4 and r["ms_per_step"] > 0
    assert rows[0]["ratio_to_flow_matching"] == 1.0
