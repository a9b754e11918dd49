"""``train.compile``: the compiled training step gives the same parameters as the eager one.

MeanFlow runs its JVP on the eager module and the plain (r = t) forward through the compiled one.
The quick test uses the ``aot_eager`` backend (the real dynamo + AOTAutograd graph capture, no
C++ codegen); the inductor test is marked slow (about a minute of compilation on a CPU).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import TINY_RECIPE

from onestep.config import from_dict
from onestep.train.loop import Trainer
from onestep.utils.device import allow_tf32, set_tf32_settings, tf32_settings


def _train(tmp_path, objective: str, steps: int, **train):
    raw = yaml.safe_load(TINY_RECIPE)
    raw["objective"] = {"name": objective}
    raw["train"].update(train)
    trainer = Trainer(from_dict(raw), tmp_path / f"{objective}-{train.get('compile_backend', 'eager')}", progress=False)
    losses = [trainer.train_step(step)["loss"] for step in range(steps)]
    return trainer, losses


def _assert_same_run(tmp_path, objective, steps, backend, atol):
    torch._dynamo.reset()
    eager, eager_losses = _train(tmp_path, objective, steps)
    compiled, compiled_losses = _train(tmp_path, objective, steps, compile=True, compile_backend=backend)
    assert compiled.train_step_fn.train_net is not compiled.net
    assert all(not k.startswith("_orig_mod") for k in compiled.net.state_dict())  # checkpoints save self.net
    assert eager_losses[0] != eager_losses[-1]
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=atol)
    for (name, a), b in zip(eager.net.named_parameters(), compiled.net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("objective", ["flow_matching", "meanflow"])
def test_compiled_step_matches_eager(tmp_path, one_thread, objective):
    _assert_same_run(tmp_path, objective, 3, "aot_eager", 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["flow_matching", "meanflow"])
def test_inductor_step_matches_eager(tmp_path, one_thread, objective):
    _assert_same_run(tmp_path, objective, 3, "inductor", 1e-5)


def test_compile_mode_is_validated():
    raw = yaml.safe_load(TINY_RECIPE)
    raw["train"]["compile_mode"] = "fastest"
    with pytest.raises(Exception, match="compile_mode"):
        from_dict(raw)


def test_tf32_turns_on_cudas_tf32_for_the_run(tmp_path, one_thread):
    # Set and read through onestep's helpers (the API the installed torch documents), never by
    # patching torch's backend modules; the process's settings are restored afterwards.
    before = tf32_settings()
    try:
        allow_tf32(False)
        _train(tmp_path / "off", "flow_matching", 1)
        assert tf32_settings() == {"matmul": "ieee", "cudnn_conv": "ieee"}
        _train(tmp_path / "on", "flow_matching", 1, tf32=True)
        assert tf32_settings() == {"matmul": "tf32", "cudnn_conv": "tf32"}
    finally:
        set_tf32_settings(before)
    assert tf32_settings() == before
    raw = yaml.safe_load(TINY_RECIPE)
    raw["train"]["tf32"] = "yes"
    with pytest.raises(Exception, match="tf32"):
        from_dict(raw)
