"""``onestep env``: onestep's version and commit, Python, torch (+ CUDA, cuDNN, NCCL), the packages
onestep uses, the CPU / GPUs and the thread settings: what a bug report or a result needs."""

from __future__ import annotations

import json


def run(args) -> int:
    from onestep.utils.environment import environment, format_environment

    env = environment()
    print(json.dumps(env, indent=2) if args.json else format_environment(env))
    return 0
