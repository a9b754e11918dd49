"""Checkpoint specs wherever a checkpoint is taken: sampling public checkpoints, training with a
public teacher or initialisation, onestep exports, and the Python API.

The public files are tiny state dicts in the official key layout (``test_formats.make_state``:
width 32, 2 blocks, 2 heads, 4×8×8 latents, 5 classes); the latent data is a tiny shard written
here in the on-disk format of ``data: latents``.
"""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_formats import CLASSES, HEADS, SIDE, C, make_state, ref_forward, save
from waiting import HANG_GUARD_S

from onestep.cli import main
from onestep.config import load_config
from onestep.formats import VPEpsilonTeacher, load_teacher
from onestep.objectives.common import velocity
from onestep.registry import BACKBONES, ConfigError
from onestep.train.loop import Trainer
from onestep.utils.seeding import sample_seed, seeded_noise

F32 = torch.float32
SHAPE = (C, SIDE, SIDE)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def latents(tmp_path):
    """16 latents 4×8×8 with labels 0..4 in one shard (the ``latents`` dataset's format)."""
    root = tmp_path / "latents"
    root.mkdir()
    rng = np.random.default_rng(0)
    np.savez(
        root / "shard_0.npz",
        latents=rng.standard_normal((16, *SHAPE)).astype(np.float32),
        labels=np.arange(16) % CLASSES,
    )
    return root


def official(tmp_path, fmt, seed=0):
    """A tiny float32 file of format ``fmt`` and its spec (``#heads`` since width 32 is not standard)."""
    sd = make_state(seed, cout=C if fmt == "repa_sit" else 2 * C, dtype=F32)
    return f"{fmt}:{save(sd, tmp_path, f'{fmt}{seed}.pt')}#heads={HEADS}", sd


def recipe(tmp_path, root, objective, train="", name="r.yaml", classes=CLASSES):
    path = tmp_path / name
    path.write_text(
        f"data: {{name: latents, root: {root}, num_classes: {classes}}}\n"
        "backbone: {name: test_dit}\n"
        f"objective: {objective}\n"
        f"train: {{steps: 2, batch_size: 4, lr: 0.001, log_every: 1, num_preview: 2, checkpoint_every: 0{train}}}\n"
    )
    return path


def euler(teacher, n, nfe, seed, guidance=1.0):
    """onestep's sample loop written out: x_1 = seeded noise, x ← x − (t − r)·v(x, t) on linspace(1, 0)
    (times as float32 tensors, one batch of n, as ``onestep sample`` computes them)."""
    x = seeded_noise([sample_seed(seed, i) for i in range(n)], SHAPE)
    y = torch.arange(n) % CLASSES
    grid = torch.linspace(1.0, 0.0, nfe + 1).tolist()
    with torch.no_grad():
        for t, r in zip(grid[:-1], grid[1:]):
            tt, rr = torch.full((n,), t), torch.full((n,), r)
            cond = teacher(x, tt, torch.zeros_like(tt), y)
            v = cond
            if guidance != 1.0:
                uncond = teacher(x, tt, torch.zeros_like(tt), torch.full_like(y, CLASSES))
                v = uncond + guidance * (cond - uncond)
            x = x - (tt - rr)[:, None, None, None] * v
    return x, y


# ------------------------------------------------------------------------------------------------
# onestep sample FORMAT:PATH


def test_sample_sit_checkpoint_is_euler_of_its_teacher(tmp_path, capsys):
    spec, sd = official(tmp_path, "sit")
    out = tmp_path / "x.npz"
    assert (
        main(
            ["sample", spec, "--nfe", "50", "--latents", "-n", "6", "--seed", "3", "--device", "cpu", "--out", str(out)]
        )
        == 0
    )
    assert "6 latents" in capsys.readouterr().out
    got = np.load(out)
    x, y = euler(load_teacher(spec), 6, 50, seed=3)
    assert got["arr_0"].dtype == np.float32 and got["arr_0"].shape == (6, *SHAPE)
    assert np.array_equal(got["arr_0"], x.numpy()) and got["arr_1"].tolist() == y.tolist()
    # ...and the teacher is SiT's network read at 1 − t, negated (the official forward, written out).
    ref, _ = euler(
        lambda z, t, h, y: (
            -ref_forward({k: v.double() for k, v in sd.items()}, z.double(), 1 - t.double(), y, heads=HEADS)[
                :, :C
            ].float()
        ),
        6,
        50,
        seed=3,
    )
    assert np.allclose(got["arr_0"], ref.numpy(), atol=1e-4)


def test_sample_guidance_on_all_channels_and_api_agree(tmp_path):
    import onestep

    spec, _ = official(tmp_path, "repa_sit")
    out = tmp_path / "g.npz"
    assert (
        main(["sample", spec, "--nfe", "3", "--guidance", "2.5", "-n", "5", "--device", "cpu", "--out", str(out)]) == 0
    )
    x, y = euler(load_teacher(spec), 5, 3, seed=0, guidance=2.5)
    assert np.array_equal(np.load(out)["arr_0"], x.numpy())  # public checkpoints sample raw latents without a VAE
    model = onestep.load_model(spec)
    assert (model.data_shape, model.num_classes, model.decode, model.step, model.format) == (
        SHAPE,
        CLASSES,
        None,
        None,
        "repa_sit",
    )
    got, labels = onestep.generate(model, 5, nfe=3, guidance=2.5)
    assert torch.equal(got, x) and torch.equal(labels, y)
    # Another batch size: the same noise and labels per sample, equal up to float rounding.
    assert torch.allclose(onestep.generate(model, 5, nfe=3, guidance=2.5, batch_size=2)[0], x, atol=1e-5)
    one, labels = onestep.generate(model, 3, nfe=2, y=[4, 0, 4])
    assert labels.tolist() == [4, 0, 4] and torch.equal(onestep.generate(model, 3, nfe=2, y=[4, 0, 4])[0], one)
    same, _ = onestep.generate(model, 3, nfe=2, y=4)
    assert torch.equal(same[[0, 2]], one[[0, 2]]) and not torch.equal(same[1], one[1])
    with pytest.raises(ConfigError, match="0..4"):
        onestep.generate(model, 2, y=5)


# ------------------------------------------------------------------------------------------------
# Teachers and initialisation from public checkpoints.


def test_train_distils_a_dit_teacher_end_to_end(tmp_path, latents, capsys):
    spec, _ = official(tmp_path, "dit")
    path = recipe(
        tmp_path,
        latents,
        f"{{name: consistency_distillation, teacher: '{spec}', teacher_guidance: 1.5, num_scales: 4}}",
    )
    trainer = Trainer(load_config(path), tmp_path / "unused")
    assert isinstance(trainer.objective.teacher, VPEpsilonTeacher) and trainer.objective.teacher_guidance == 1.5
    run = tmp_path / "run"
    assert main(["train", str(path), "--run-dir", str(run), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    # The teacher must fit the student's data: 6 classes here, 5 in the file.
    capsys.readouterr()
    other = recipe(
        tmp_path, latents, f"{{name: consistency_distillation, teacher: '{spec}'}}", name="o.yaml", classes=6
    )
    assert main(["train", str(other), "--run-dir", str(tmp_path / "bad"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "objective.teacher=dit:" in err and "5 classes" in err and "6 classes" in err


def test_meanflow_distils_sit_with_a_guidance_interval_from_its_own_init(tmp_path, latents):
    spec, _ = official(tmp_path, "sit")
    path = recipe(
        tmp_path,
        latents,
        f"{{name: meanflow, teacher: '{spec}', teacher_guidance: 1.5, teacher_guidance_interval: [0.0, 0.7]}}",
        train=f", init_from: '{spec}'",
    )
    trainer = Trainer(load_config(path), tmp_path / "run")
    teacher = load_teacher(spec)
    assert trainer.objective.teacher_guidance_interval == (0.0, 0.7)
    # init_from sit: at h = 0 the student is exactly the teacher's velocity, before training.
    z = torch.randn(5, *SHAPE)
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    y = torch.tensor([0, 1, 2, 3, CLASSES])
    with torch.no_grad():
        assert torch.equal(trainer.net(z, t, torch.zeros_like(t), y), teacher(z, t, None, y))
    trainer.run()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_dit_init_is_refused_in_one_line(tmp_path, latents, capsys):
    spec, _ = official(tmp_path, "dit")
    path = recipe(tmp_path, latents, "{name: flow_matching}", train=f", init_from: '{spec}'")
    for command in (
        ["validate", str(path)],
        ["train", str(path), "--dry-run"],
        ["train", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"],
    ):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "train.init_from" in err and "cannot initialise" in err, err


def test_missing_checkpoints_are_notes_at_validate_and_errors_at_train(tmp_path, latents, capsys):
    path = recipe(
        tmp_path,
        latents,
        "{name: meanflow, teacher: 'sit:/nowhere/SiT-XL-2-256x256.pt'}",
        train=", init_from: 'repa_sit:/nowhere/last.pt'",
    )
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "objective.teacher=sit:/nowhere/SiT-XL-2-256x256.pt: not found" in out and "train.init_from=repa_sit" in out
    assert main(["train", str(path), "--dry-run"]) == 0
    assert "not found" in capsys.readouterr().err
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err
    for name in ("meanflow_xl2_distill_sit", "cd_xl2_dit", "meanflow_xl2_from_repa"):
        assert main(["validate", name]) == 0
        assert "not found here" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Export, and the API on onestep runs.


@pytest.fixture
def toy_run(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(tiny_recipe),
                "--run-dir",
                str(run),
                "--no-progress",
                "train.steps=4",
                "train.checkpoint_every=0",
            ]
        )
        == 0
    )
    assert main(["eval", str(run), "--nfe", "1", "--num-samples", "64", "--metrics", "energy_distance"]) == 0
    return run


def test_export_loads_back_bit_for_bit(toy_run, tmp_path, capsys, monkeypatch):
    import onestep
    from onestep.formats import is_export, load_run

    out = tmp_path / "export"
    assert main(["export", str(toy_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "manifest.json", "model.safetensors"]
    assert is_export(out) and not is_export(toy_run)
    card = (out / "README.md").read_text()
    row = [json.loads(line) for line in (toy_run / "metrics.jsonl").read_text().splitlines()][0]
    assert "`meanflow`" in card and "`test_mlp`" in card and "checkerboard" in card and "onestep sample export" in card
    assert "energy_distance" in card and f"{row['value']:.5g}" in card and row["implementation"] in card
    assert row["reference"] in card and "onestep.load_model" in card
    # The same samples from the run, the export (CLI) and the API on the export.
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(["sample", str(toy_run), "-n", "40", "--nfe", "2", "--seed", "5", "--out", str(a)]) == 0
    assert main(["sample", str(out), "-n", "40", "--nfe", "2", "--seed", "5", "--out", str(b)]) == 0
    a, b = np.load(a)["arr_0"], np.load(b)["arr_0"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("an export must load without pickle")

    with monkeypatch.context() as patched:
        for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
            patched.setattr(module, name, no_pickle)
        model = onestep.load_model(str(out))
        same = onestep.load_model(f"onestep:{out}")
    x, labels = onestep.generate(model, 40, nfe=2, seed=5)
    assert labels is None and model.step == 4 and model.format == "onestep"
    assert np.array_equal(a, b) and np.array_equal(a, x.numpy())
    assert torch.equal(onestep.generate(same, 40, nfe=2, seed=5)[0], x)
    assert all(
        torch.equal(p, q) for p, q in zip(model.net.state_dict().values(), load_run(toy_run).net.state_dict().values())
    )
    # A non-empty DIR is refused unless --force; --no-ema exports the raw weights.
    capsys.readouterr()
    assert main(["export", str(toy_run), "--out", str(out), "--no-ema"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(toy_run), "--out", str(out), "--no-ema", "--force"]) == 0
    raw = load_run(toy_run, use_ema=False).net.state_dict()
    assert all(torch.equal(raw[k], v) for k, v in onestep.load_model(str(out)).net.state_dict().items())
    ema_only = tmp_path / "ema"
    assert main(["export", str(toy_run / "checkpoints" / "last.pt"), "--out", str(ema_only)]) == 0
    with pytest.raises(ConfigError, match="only the EMA"):
        onestep.load_model(str(ema_only), ema=False)


def test_export_is_a_teacher_and_an_initialisation(toy_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(toy_run), "--out", str(out)]) == 0
    path = tmp_path / "distil.yaml"
    path.write_text(
        "data: {name: checkerboard}\nbackbone: {name: test_mlp}\n"
        f"objective: {{name: meanflow, teacher: '{out}'}}\n"
        f"train: {{steps: 1, batch_size: 8, init_from: 'onestep:{out}'}}\n"
    )
    trainer = Trainer(load_config(path), tmp_path / "student")
    exported = load_teacher(str(out)).state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in trainer.net.state_dict().items())
    assert all(torch.equal(v, exported[k]) for k, v in trainer.objective.teacher.state_dict().items())
    assert not any(p.requires_grad for p in trainer.objective.teacher.parameters())


def test_sample_and_eval_a_run_without_its_data(tmp_path, latents, capsys):
    """A latent run whose shards are gone still samples (a stand-in keeps shape, classes, scale)."""
    import shutil

    path = recipe(tmp_path, latents, "{name: flow_matching}")
    run = tmp_path / "run"
    assert main(["train", str(path), "--run-dir", str(run), "--no-progress", "train.steps=1"]) == 0
    before = tmp_path / "before.npz"
    assert main(["sample", str(run), "-n", "3", "--nfe", "2", "--out", str(before)]) == 0
    shutil.rmtree(latents)
    after = tmp_path / "after.npz"
    assert main(["sample", str(run), "-n", "3", "--nfe", "2", "--out", str(after)]) == 0
    assert np.array_equal(np.load(after)["arr_0"], np.load(before)["arr_0"])
    assert main(["sample", str(run), "-n", "3", "--guidance", "2", "--out", str(after)]) == 0  # flow matching guides
    capsys.readouterr()
    assert main(["eval", str(run), "--nfe", "1", "--num-samples", "8"]) == 2
    err = capsys.readouterr().err
    assert "\n" not in err.strip() and "not available" in err and "--reference" in err


# ------------------------------------------------------------------------------------------------
# Small pieces.


def test_guidance_interval_guides_only_inside():
    net = BACKBONES.build("test_dit", num_classes=CLASSES)
    z = torch.randn(4, *SHAPE)
    t = torch.tensor([0.1, 0.5, 0.7, 0.9])
    y = torch.tensor([0, 1, 2, 3])
    plain, guided = velocity(net, z, t, y), velocity(net, z, t, y, 3.0)
    windowed = velocity(net, z, t, y, 3.0, interval=(0.0, 0.7))
    assert torch.equal(windowed[:3], guided[:3]) and torch.equal(windowed[3], plain[3])
    with pytest.raises(ConfigError, match="teacher_guidance_interval"):
        from onestep.registry import OBJECTIVES

        OBJECTIVES.build("meanflow", teacher_guidance_interval=[0.8, 0.2])


def test_import_onestep_stays_light():
    code = (
        "import sys, onestep; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert callable(onestep.load_model) and callable(onestep.generate); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_dmf_xl2_recipe_converts_a_repa_file_exactly(tmp_path, latents, capsys):
    """recipes/dmf_xl2_from_repa.yaml, shrunk to the tiny official-layout REPA file: its dry run, and
    the conversion: before any fine-tuning the decoupled student at h = 0 is REPA's velocity exactly,
    and the Euler sampler of flow matching gives the source's samples; then it trains."""
    spec, _ = official(tmp_path, "repa_sit")
    tiny = [
        f"data.root={latents}",
        f"data.num_classes={CLASSES}",
        "backbone.name=test_dit",
        f"backbone.input_shape=[{C},{SIDE},{SIDE}]",
        f"backbone.num_classes={CLASSES}",
        "backbone.decoupled_depth=1",
        f"train.init_from={spec}",
        "train.steps=2",
        "train.batch_size=4",
        "train.precision=fp32",
        "train.num_preview=2",
        "train.sample_every=0",
    ]
    assert main(["train", "dmf_xl2_from_repa", "--dry-run", *tiny]) == 0
    out = capsys.readouterr().out
    assert "name: dmf" in out and "decoupled_depth: 1" in out and "# backbone test_dit" in out
    trainer = Trainer(load_config("dmf_xl2_from_repa", tiny), tmp_path / "run")
    teacher = load_teacher(spec)
    z = torch.randn(5, *SHAPE)
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    y = torch.tensor([0, 1, 2, 3, CLASSES])
    with torch.no_grad():
        assert torch.equal(trainer.net(z, t, torch.zeros_like(t), y), teacher(z, t, None, y))
        # Flow-map steps of the untrained student are not the flow (the decoder sees r), but its
        # velocity at h = 0 is: Euler steps of it are the source's Euler samples.
        from onestep.registry import OBJECTIVES
        from onestep.sampling import sample

        fm = OBJECTIVES.build("flow_matching")
        noise, labels = torch.randn(4, *SHAPE), torch.arange(4) % CLASSES
        assert torch.equal(sample(fm, trainer.net, noise, labels, nfe=4), sample(fm, teacher, noise, labels, nfe=4))
    trainer.run()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
