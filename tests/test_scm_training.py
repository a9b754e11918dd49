"""sCM through the training loop (``onestep train``): the learned weight head w_φ(ϑ) is optimized,
EMA'd and checkpointed with the network, a resumed run equals a straight one bit for bit (network,
EMA, weight head and its EMA), sCD reads its teacher from a run directory, and bf16 autocast trains
on the CPU. The two-rank equivalence is in test_distributed.py, the pinned numbers in test_golden.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from onestep.cli import main
from onestep.config import from_dict
from onestep.utils.rundir import load_checkpoint

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
]

TEACHER = """
seed: 2
data: {name: checkerboard}
backbone: {name: test_mlp}
objective: {name: flow_matching}
train: {steps: 3, batch_size: 32, lr: 0.002, log_every: 1, checkpoint_every: 0, num_preview: 4}
"""

# Warm-up of 3 steps: the resumed half starts with r = 1, the first half ramps r = 0, 1/3, 2/3, 1.
SCM = """
seed: 4
data: {name: checkerboard}
backbone: {name: test_mlp}
objective: {name: scm, mode: MODE, tangent_warmup_steps: 3TEACHER}
train: {steps: 8, batch_size: 32, lr: 0.003, ema_decay: 0.7, log_every: 1, checkpoint_every: 0, num_preview: 4INIT}
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 3-step flow-matching run directory (teacher and init of the sCD runs)."""
    root = tmp_path_factory.mktemp("scm_teacher")
    recipe = root / "teacher.yaml"
    recipe.write_text(TEACHER)
    run = root / "run"
    torch.set_num_threads(1)
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress"]) == 0
    return run


def recipe_text(mode: str, teacher=None) -> str:
    teach = f", teacher: {teacher}" if mode == "scd" else ""
    init = f", init_from: {teacher}" if teacher is not None else ""
    return SCM.replace("MODE", mode).replace("TEACHER", teach).replace("INIT", init)


def write(tmp_path, name: str, text: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def train(recipe, run, *overrides: str) -> None:
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress", *overrides]) == 0


def head_state(ckpt: dict, key: str = "objective_params") -> dict[str, torch.Tensor]:
    assert key in ckpt, sorted(ckpt)
    return ckpt[key]


@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_weight_head_receives_gradients_changes_and_is_checkpointed(mode, teacher, tmp_path):
    from onestep.train.loop import Trainer

    text = recipe_text(mode, teacher if mode == "scd" else None)
    trainer = Trainer(from_dict(yaml.safe_load(text)), tmp_path / "direct", progress=False)
    head = trainer.objective.trainable
    assert head is not None and all(p.abs().sum() == 0 for p in head.parameters())  # zero init: w = 0
    # Optimized by the same optimizer as the net.
    opt_params = {id(p) for group in trainer.train_step_fn.opt.param_groups for p in group["params"]}
    assert all(id(p) in opt_params for p in head.parameters())
    trainer.train_step(0)
    assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
    assert head.linear.bias.grad is not None and head.linear.bias.grad.abs().sum() > 0

    run = tmp_path / "run"
    train(write(tmp_path, mode, text), run)
    ckpt = load_checkpoint(run)
    params, ema = head_state(ckpt), head_state(ckpt, "objective_params_ema")
    assert set(params) == set(ema) == {"linear.weight", "linear.bias"}
    assert params["linear.bias"].abs().item() > 1e-4 and params["linear.weight"].abs().sum().item() > 1e-4
    assert not torch.equal(params["linear.weight"], ema["linear.weight"])  # EMA lags the raw head
    assert ema["linear.weight"].abs().sum().item() > 0
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(math.isfinite(r["loss"]) for r in rows)
    assert {"distance", "logvar", "warmup", "tangent_norm"} <= set(rows[0])
    assert [r["warmup"] for r in rows[:4]] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0], abs=1e-6)
    assert rows[0]["logvar"] == 0.0 and rows[-1]["logvar"] != 0.0
    # Evaluation and sampling rebuild the objective without the teacher and without the head.
    assert main(["eval", str(run), "--nfe", "1", "--nfe", "2", "--num-samples", "64"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {m["nfe"] for m in metrics} == {1, 2} and all(math.isfinite(m["value"]) for m in metrics)


@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_resume_is_exact(mode, teacher, tmp_path):
    """4 + 4 resumed steps equal 8 straight steps bit for bit: net, EMA, weight head and its EMA."""
    recipe = write(tmp_path, mode, recipe_text(mode, teacher if mode == "scd" else None))
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(recipe, straight)
    train(recipe, split, "train.steps=4")
    half = load_checkpoint(split)
    assert half["step"] == 4 and "objective_params" in half and "objective_params_ema" in half
    assert main(["train", "--resume", str(split), "--no-progress", "train.steps=8"]) == 0
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["step"] == b["step"] == 8
    for section in ("model", "ema", "objective_params", "objective_params_ema"):
        assert set(a[section]) == set(b[section]), section
        for key in a[section]:
            assert torch.equal(a[section][key], b[section][key]), (section, key)
    rows_a = (straight / "stats.jsonl").read_text().splitlines()
    rows_b = (split / "stats.jsonl").read_text().splitlines()
    strip = [
        {k: v for k, v in json.loads(r).items() if k not in ("steps_per_s", "images_per_s", "time_s")} for r in rows_a
    ]
    assert strip == [
        {k: v for k, v in json.loads(r).items() if k not in ("steps_per_s", "images_per_s", "time_s")} for r in rows_b
    ]


def test_scd_student_starts_as_the_teacher_denoiser(teacher, tmp_path):
    """init_from the teacher with interval zero: before any step, the student's F is the teacher's, so
    the sCD training signal dx/dϑ equals σ_d·F⁻ and only the JVP part remains in the tangent."""
    from onestep.train.loop import Trainer

    trainer = Trainer(from_dict(yaml.safe_load(recipe_text("scd", teacher))), tmp_path / "r", progress=False)
    obj, net = trainer.objective, trainer.net
    x = torch.randn(16, 2)
    th = torch.linspace(0.1, 1.5, 16, dtype=torch.float64)
    terms = obj.tangent_terms(net, x, None, e=torch.randn(16, 2), theta=th, step=0)
    torch.testing.assert_close(terms["dxdt"], obj.sigma_d * terms["F_minus"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "data, backbone, mode",
    [
        ("{name: checkerboard}", "{name: test_mlp}", "scd"),
        ("{name: digits, conditional: true}", "{name: test_dit}", "sct"),
    ],
)
def test_bf16_trains_on_the_cpu(data, backbone, mode, teacher, tmp_path):
    text = (
        recipe_text(mode, teacher if mode == "scd" else None)
        .replace("{name: checkerboard}", data)
        .replace("{name: test_mlp}", backbone)
    )
    run = tmp_path / "bf16"
    train(write(tmp_path, "bf16", text), run, "train.precision=bf16", "train.steps=2", "train.batch_size=8")
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    ckpt = load_checkpoint(run)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    head = head_state(ckpt)
    assert head["linear.weight"].dtype == torch.float32 and head["linear.bias"].abs().item() > 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
