"""tools/gpu_check.py: every part runs its real code path on the CPU at tiny sizes; failures, timeouts
and the budget are recorded part by part (no timing assertions)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from waiting import HANG_GUARD_S

TOOL = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.py"
PARTS = ["environment", "numerics", "bench", "sampling", "distributed", "bench_compile"]


# Timeouts scaled far past what the tiny parts need on any machine (the budget-skipping and hung-part tests
# set their own small budget): no part's outcome depends on the machine's speed.
SCALE = ["--timeout-scale", "30"]


def _run(tmp_path, *args, timeout=HANG_GUARD_S):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--device", "cpu", "--tiny", "--out", str(out), *SCALE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else None
    return proc, report, out


def _tool_module():
    spec = importlib.util.spec_from_file_location("gpu_check_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_every_part_ok(tmp_path):
    proc, report, out = _run(tmp_path, "--budget-s", "36000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report is not None and list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        rows = (part.get("result") or {}).get("rows") or []
        failed_rows = [r for r in rows if isinstance(r, dict) and r.get("error")]
        assert part["status"] == "ok", (name, part.get("error"), part.get("reason"), failed_rows)
    assert report["finished"] and (out / "gpu_check.md").is_file()
    parts = {name: part["result"] for name, part in report["parts"].items()}

    info = parts["environment"]["info"]
    assert info["torch"] == torch.__version__ and info["cpu_count"] >= 1
    assert str(TOOL.parent.parent) in info["onestep"]  # this checkout's package, not an installed one
    assert info["sdpa_runs"]["math"]["float32"] == "ok" and "math: bf16 ok, fp32 ok" in info["sdpa_runs_summary"]
    assert set(info["sdpa_enabled"]) >= {"flash", "mem_efficient", "math"}

    rows = parts["numerics"]["rows"]
    given = [r for r in rows if r["check"] == "meanflow loss_given"]
    cases = (("fp32", True), ("bf16", True), ("bf16", False))
    assert {(r["precision"], r["target_fp32"], r["kernel"]) for r in given} == {
        (p, f, k) for p, f in cases for k in ("fused", "explicit", "sdpa_math")
    }
    for r in given:  # fused == explicit == float64 within the documented tolerances
        assert r["pass"] is True and r["vs_float64"]["finite"], r
        tol = r["tolerance"]
        assert r["vs_float64"]["loss_rel"] <= tol["loss"] and r["vs_float64"]["grad_rel"] <= tol["grad"]
        assert r["vs_float64"]["dudt_rel"] <= tol["dudt"]
        if r["kernel"] != "explicit":
            assert r["vs_explicit"]["grad_rel"] <= tol["grad"]
    generic = {r["objective"]: r for r in rows if r["check"].startswith("objective.loss")}
    assert generic["meanflow"]["pass"] is True  # the control of the CPU-drawn randomness
    for name in ("improved_meanflow", "scm"):
        assert generic[name].get("status") == "not present" or generic[name]["pass"] is True

    tf32 = [r for r in parts["bench"]["rows"] if r["tf32"]]  # the eager part reruns three rows with TF32 on
    assert [r["objective"] for r in tf32] == ["flow_matching", "meanflow", "meanflow:jvp_pass=separate"]
    assert tf32[0]["ratio_to_flow_matching"] == 1.0 and all(r["label"].endswith(", TF32") for r in tf32)
    assert [c["tf32"] for c in parts["bench"]["calls"]] == [False, True]
    for part, compiled in (("bench", False), ("bench_compile", True)):
        rows = [r for r in parts[part]["rows"] if not r["tf32"]]
        assert [r["objective"] for r in rows if r["objective"] == "flow_matching"] == ["flow_matching"]
        assert {r["objective"] for r in rows} == {
            "flow_matching",
            "meanflow",
            "meanflow:target_fp32=false",
            "meanflow:jvp_kernel=explicit",
            "meanflow:jvp_only_r_neq_t=false,jvp_kernel=explicit",
            "meanflow:jvp_pass=separate",
            "scm",
            "scm:jvp_pass=joint",
            "scm:target_fp32=false",
        }
        for r in rows:
            assert r["compile"] is compiled and r["ms_per_step"] > 0 and r["ratio_to_flow_matching"] > 0
            assert r["batch"] == 4 and r["precision"] == "bf16"
        fm = next(r for r in rows if r["objective"] == "flow_matching")
        assert fm["ratio_to_flow_matching"] == 1.0
        targets = [t for t in parts[part]["targets"]["rows"] if not t["tf32"]]
        assert {t["objective"] for t in targets} == {
            "meanflow",
            "meanflow:target_fp32=false",
            "meanflow:jvp_pass=separate",
        }
        assert all(isinstance(t["time_target_met"], bool) for t in targets)
    assert all(r["mem_ratio_to_flow_matching"] > 0 for r in parts["bench"]["rows"])  # CPU memory pass (eager)

    rows = parts["sampling"]["rows"]
    assert len(rows) == 2 and all(r["images_per_s"] > 0 and r["finite"] and r["nfe"] == 1 for r in rows)

    rows = {r["run"]: r for r in parts["distributed"]["rows"]}
    smoke = rows["process group smoke"]
    assert smoke["ok"] and smoke["backend"] == "gloo" and smoke["all_reduce_ok"]
    toy = rows["toy_meanflow via torchrun"]
    assert toy["ok"] and toy["last_line_is_run_dir"] and toy["checkpoint"] and toy["final_step"] == 4
    digits = rows["digits_meanflow via torchrun"]
    assert digits["ok"] and digits["metrics_rows"] > 0 and digits["eval_steps"] == [2, 4]
    assert {"fd@1", "is@1", "acc@1"} <= set(digits["final_metrics"])

    md = (out / "gpu_check.md").read_text()
    for name in PARTS:
        assert f"## {name}: ok" in md
    assert "| part | status |" in proc.stdout  # the table is printed at the end


def test_failed_part_is_recorded_and_later_parts_run(tmp_path):
    proc, report, out = _run(
        tmp_path, "--parts", "environment,sampling", "--fail-part", "environment", "--budget-s", "36000"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = report["parts"]
    assert list(parts) == ["environment", "sampling"]
    assert parts["environment"]["status"] == "failed" and parts["environment"]["returncode"] != 0
    assert "injected failure" in parts["environment"]["error"]
    assert parts["sampling"]["status"] == "ok" and len(parts["sampling"]["result"]["rows"]) == 2
    md = (out / "gpu_check.md").read_text()
    assert "## environment: failed" in md and "## sampling: ok" in md


def test_hung_part_times_out_and_a_small_budget_skips_later_parts(tmp_path):
    proc, report, _ = _run(tmp_path, "--budget-s", "20", "--fail-part", "environment:hang")
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = report["parts"]
    assert parts["environment"]["status"] == "timeout" and "timed out" in parts["environment"]["error"]
    for name in PARTS[1:]:
        assert parts[name]["status"] == "skipped" and "budget" in parts[name]["reason"], (name, parts[name])


def test_bad_arguments_exit_2(tmp_path):
    for args in (["--parts", "nope"], ["--timeouts", "bench=x"], ["--budget-s", "0"], ["--fail-part", "bench:boom"]):
        proc, report, _ = _run(tmp_path, *args)
        assert proc.returncode == 2 and report is None, (args, proc.stderr)


def test_oom_halving_reruns_only_what_ran_out_with_flow_matching():
    tool = _tool_module()
    fits = {"flow_matching": 256, "meanflow": 256, "plain": 64}
    calls = []

    def run(objectives, batch):
        calls.append((list(objectives), batch))
        return [
            {"objective": o, "batch": batch, **({"error": "out of memory"} if batch > fits[o] else {})}
            for o in objectives
        ], None

    rows, error = tool.oom_halving(["flow_matching", "meanflow", "plain"], 256, 8, run)
    assert error is None
    assert calls == [
        (["flow_matching", "meanflow", "plain"], 256),
        (["flow_matching", "plain"], 128),
        (["flow_matching", "plain"], 64),
    ]
    assert [(r["objective"], r["batch"]) for r in rows if "error" not in r] == [
        ("flow_matching", 256),
        ("meanflow", 256),
        ("flow_matching", 128),
        ("flow_matching", 64),
        ("plain", 64),
    ]
    # Never fits: stops at the minimum batch and says so.
    fits["plain"] = 4
    calls.clear()
    rows, error = tool.oom_halving(["flow_matching", "plain"], 32, 8, run)
    assert [b for _, b in calls] == [32, 16, 8] and "out of memory down to batch 8" in error
    # A call that dies without rows (not out of memory) ends the search with its error.
    rows, error = tool.oom_halving(["flow_matching", "plain"], 32, 8, lambda objs, b: ([], "bench exit 1: boom"))
    assert rows == [] and error == "bench exit 1: boom"


def test_cpu_random_gives_the_same_draws_in_any_dtype():
    tool = _tool_module()
    draws = []
    for dtype in (torch.float32, torch.float64):
        with tool.cpu_random(5):
            x = torch.zeros(3, 4, dtype=dtype)
            draws.append(
                [
                    torch.randn(3, 4, dtype=dtype),
                    torch.rand(7, dtype=dtype),
                    torch.randn_like(x),
                    torch.randint(0, 10, (6,)),
                    torch.randperm(9),
                    torch.empty(5, dtype=dtype).normal_(),
                    torch.multinomial(torch.tensor([0.2, 0.3, 0.5], dtype=dtype), 4, replacement=True),
                ]
            )
    for a, b in zip(*draws):
        assert torch.equal(a.double(), b.double())
    assert draws[1][0].dtype == torch.float64 and not torch.equal(draws[0][0], draws[0][2])
    assert torch.randn(2).dtype == torch.float32  # restored


def test_generic_objective_rows_match_float64_with_cpu_drawn_randomness():
    """The objective.loss(...) comparison used for improved_meanflow / scm, on objectives that are here
    (ECT draws float64 times, flow matching drops labels): device (here the CPU, fp32) and the float64
    reference see the same draws; an objective that cannot be built is one error row."""
    tool = _tool_module()
    spec = tool.SIZES["tiny"]["numerics"]
    net = tool.randomized_net(spec)
    x, y, *_ = tool.numerics_inputs(spec)
    for name in ("ect", "flow_matching"):
        rows = tool.generic_objective_rows(name, net, x, y, torch.device("cpu"))
        assert [r["precision"] for r in rows] == ["fp32", "bf16"]
        assert all(r["pass"] is True for r in rows), rows
        assert rows[0]["vs_float64"]["grad_rel"] < 1e-5  # fp32: the same randomness, not merely close
    (row,) = tool.generic_objective_rows("consistency_training", net, x, y, torch.device("cpu"))
    assert row["pass"] is False and "total_steps" in row["error"]


def test_bench_skip_oom_and_stream(monkeypatch, capsys):
    """tools/bench.py --skip-oom --stream (what the bench parts call): an out-of-memory row becomes an
    error row and the next row runs; rows come out one by one with ratios to the earlier flow-matching row."""
    spec = importlib.util.spec_from_file_location("bench_tool", TOOL.parent / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def fake_bench_one(**c):
        if c["objective"].startswith("meanflow:jvp_only"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if c["objective"] == "boom":
            raise RuntimeError("something else")
        ms = {"flow_matching": 10.0, "meanflow": 11.0}[c["objective"]]
        return {
            "backbone": c["backbone"],
            "objective": c["objective"],
            "batch": c["batch"],
            "compile": c["compile"],
            "ms_per_step": ms,
            "peak_mem_mb": 2 * ms,
        }

    monkeypatch.setattr(bench, "bench_one", fake_bench_one)
    assert (
        bench.main(
            [
                "--backbones",
                "test_dit",
                "--batch",
                "8",
                "--device",
                "cpu",
                "--skip-oom",
                "--stream",
                "--objectives",
                "flow_matching;meanflow:jvp_only_r_neq_t=false;meanflow",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["objective"] for r in rows] == ["flow_matching", "meanflow:jvp_only_r_neq_t=false", "meanflow"]
    assert rows[1]["error"] == "out of memory" and rows[1]["ms_per_step"] is None
    assert rows[1]["ratio_to_flow_matching"] is None
    assert rows[0]["ratio_to_flow_matching"] == 1.0
    assert rows[2]["ratio_to_flow_matching"] == 1.1 and rows[2]["mem_ratio_to_flow_matching"] == 1.1
    with pytest.raises(RuntimeError, match="something else"):  # anything but an allocation failure stops it
        bench.main(["--device", "cpu", "--skip-oom", "--objectives", "boom"])
