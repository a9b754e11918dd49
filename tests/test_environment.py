"""``onestep env``, the environment a run records (``environment.jsonl``, one row per training start or
resume), ``compare --env``, and the CLI as a package with one module per subcommand."""

import importlib
import json

import torch

import onestep
from onestep.cli import build_parser, main
from onestep.utils.environment import describe_device, environment, environment_summary, format_environment
from onestep.utils.rundir import RunDir
from onestep.utils.version import versions


def test_env_prints_what_a_bug_report_needs(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    lines = dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("- "))
    assert lines["onestep"].startswith(onestep.__version__)
    assert lines["torch"] == torch.__version__  # with its build tag (+cu130, +cpu)
    for name in ("Python", "torchvision", "timm", "torch-fidelity", "numpy", "CPU", "torch threads"):
        assert name in lines, name
    assert f"torch threads: {torch.get_num_threads()}" in text
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["packages"]["torch"] == torch.__version__ and env["cuda_available"] == torch.cuda.is_available()
    assert set(env["tf32"]) == {"matmul", "cudnn_conv"} and env["cpu_count"] >= 1


def test_a_run_records_its_environment_per_stretch_and_compare_shows_it(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_recipe), "--run-dir", str(run), "--no-progress", "train.steps=6"]) == 0
    assert main(["train", "--resume", str(run), "--no-progress", "train.steps=12"]) == 0
    rows = RunDir(run).read_environments()
    assert [r["step"] for r in rows] == [0, 6]  # the start and the resume
    assert all(r["packages"]["torch"] == torch.__version__ and r["onestep"] == onestep.__version__ for r in rows)
    meta = RunDir(run).read_config()["meta"]
    assert meta["versions"] == json.loads(json.dumps(versions()))  # config.yaml keeps the short form
    capsys.readouterr()
    assert main(["compare", str(run), "--env", "--format", "csv"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()[:2]
    cells = dict(zip(header.split(","), row.split(",")))
    assert cells["trained with torch"] == torch.__version__
    assert cells["trained with device"] == describe_device(rows[0])


def test_environment_summary_joins_differing_stretches():
    env = environment()
    moved = json.loads(json.dumps(env))
    moved["packages"]["torch"] = "9.9.9"
    moved["gpus"] = [{"name": "NVIDIA H200", "memory_gib": 139.8, "capability": "9.0"}]
    summary = environment_summary([env, env, moved])
    assert summary["torch"] == f"{torch.__version__} -> 9.9.9"
    assert summary["device"].endswith("-> 1x NVIDIA H200")
    assert environment_summary([]) == {"onestep": "?", "torch": "?", "device": "?"}
    assert "GPU 0: NVIDIA H200" in format_environment({**moved, "cuda_available": True})


def test_every_subcommand_is_its_own_module():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = set(sub.choices)
    assert {"train", "sample", "eval", "export", "compare", "suite", "plot", "ls", "validate", "env"} <= names
    for name in names:
        assert callable(importlib.import_module(f"onestep.cli.{name}").run), name
