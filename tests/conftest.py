import atexit
import os
import shutil
import tempfile

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Caches the toolkit writes (digits classifier, FID statistics) go to a per-session folder, never ~/.cache,
# removed when the session ends.
if "ONESTEP_CACHE" not in os.environ:
    os.environ["ONESTEP_CACHE"] = tempfile.mkdtemp(prefix="onestep-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ONESTEP_CACHE"], True)

TINY_RECIPE = """
seed: 3
data: {name: checkerboard}
backbone: {name: test_mlp}
objective: {name: meanflow}
train:
  steps: 12
  batch_size: 32
  lr: 0.001
  ema_decay: 0.9
  log_every: 4
  checkpoint_every: 6
  num_preview: 16
eval:
  nfe: [1, 2]
  num_samples: 256
  batch_size: 100
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (tiny ops are slower with two on a shared 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
