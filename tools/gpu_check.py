#!/usr/bin/env python
"""Every GPU figure of the toolkit from one command, within a hard time budget.

    python tools/gpu_check.py --out gpu_check_out [--budget-s 420] [--parts a,b] [--device cuda]
    python tools/gpu_check.py --device cpu --tiny --out /tmp/gc      # the same code paths, tiny sizes

Parts, in this order (cheap and most important first; ``--parts`` selects):

1. ``environment``: GPU, memory, driver / CUDA / torch / cuDNN / NCCL versions, bf16 support, the
   SDPA backends (enabled flags, and which actually run a bf16 and an fp32 call), CPU count.
2. ``numerics``: MeanFlow loss, parameter gradients and du/dt (on the r != t samples) of a small
   randomly initialised class-conditional DiT with fixed (x, y, e, t, r) through ``loss_given``, for
   each attention JVP kernel (fused, explicit, sdpa_math), in fp32 and under bf16 autocast (with
   ``target_fp32`` true and false), against a float64 CPU reference, with pass/fail against
   ``TOLERANCES``. TF32 is switched off for this part. Other JVP objectives (``improved_meanflow``,
   ``scm``, and ``meanflow`` itself as the control) go through ``objective.loss(...)`` with every
   random draw made on the CPU from one seed (``cpu_random``), so device and reference see the same
   noise and times; absent ones are reported as "not present".
3. ``bench``: ``tools/bench.py --json`` rows (DiT-B/2, 4x32x32, bf16, batch 256) for flow matching,
   MeanFlow plain JVP, MeanFlow JVP on r != t only, MeanFlow default and MeanFlow default with its
   JVP under bf16 (``target_fp32=false``): time and memory ratios to flow matching, and the targets
   (MeanFlow step <= 1.2x flow matching, peak memory <= 1.3x). A row that runs out of memory is
   rerun (with flow matching, for its ratios) at half the batch, down to ``min_batch``.
4. ``sampling``: 1-NFE images/s and peak memory of DiT-B/2 and DiT-XL/2 (random weights) through
   ``onestep.sampling.sample`` with the meanflow objective, batch 256, bf16 autocast.
5. ``distributed``: a process-group smoke test (NCCL on GPUs, gloo on the CPU: init, all_reduce,
   all_gather, onestep's broadcast_object) and two ``torchrun -m onestep train`` runs: toy_meanflow
   (300 steps; the run dir must be the last line and the checkpoint must exist) and digits_meanflow
   with periodic eval (200 steps, eval every 100; metrics.jsonl must get rows). Wall times, final
   loss and metric values are recorded. Run dirs are temporary (``--keep-runs`` keeps them).
6. ``bench_compile``: the bench rows again with ``--compile on`` (inductor), in their own part at
   the end, with a longer timeout, rows streamed so a timeout keeps the finished ones.

Every part runs in its own subprocess with its own timeout (``DEFAULT_TIMEOUTS``, ``--timeouts``,
and never past the budget): a hung CUDA call or NCCL init cannot stall the rest. A part's failure
(exit code, timeout, the exception's tail) is recorded and the next part runs; a part that no longer
fits in what is left of ``--budget-s`` (its ``MIN_SECONDS``) is recorded as skipped. After each part
``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (a markdown table per part) are rewritten atomically,
so a kill leaves the finished parts. The markdown is printed at the end. Exit status 0 whatever
the parts did (the JSON says); 2 for bad arguments.

``--tiny`` only changes sizes (tiny DiTs, batch 4, a few steps, a handful of train steps) and the
compile backend (``eager``: dynamo captures the same graphs, but inductor would spend minutes of C++
compilation per graph on a small CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = Path(__file__).resolve()
sys.path.insert(0, str(ROOT))  # workers import this checkout's onestep, whatever is installed
BENCH = ROOT / "tools" / "bench.py"

PARTS = ("environment", "numerics", "bench", "sampling", "distributed", "bench_compile")
# Seconds per part (each also ends at the budget) and the least time worth starting it with.
DEFAULT_TIMEOUTS = {"environment": 60, "numerics": 150, "bench": 180, "sampling": 120, "distributed": 240,
                    "bench_compile": 420}
MIN_SECONDS = {"environment": 5, "numerics": 15, "bench": 20, "sampling": 15, "distributed": 30,
               "bench_compile": 30}
# Numerics: pass when max|a - ref| / max|ref| (loss, du/dt) and ||a - ref|| / ||ref|| (all parameter
# gradients as one vector) are at most these, per autocast precision.
TOLERANCES = {"fp32": {"loss": 1e-4, "grad": 1e-3, "dudt": 1e-3},
              "bf16": {"loss": 5e-2, "grad": 1e-1, "dudt": 1e-1}}
# MeanFlow's targets relative to flow matching (same backbone, batch, precision, compile setting).
TARGET_TIME_RATIO, TARGET_MEM_RATIO = 1.2, 1.3

BENCH_OBJECTIVES = (  # (objective spec for tools/bench.py, label); flow matching first
    ("flow_matching", "flow matching"),
    ("meanflow", "MeanFlow default (JVP on r≠t, fused attention rule, JVP in fp32)"),
    ("meanflow:jvp_pass=separate", "MeanFlow, graph-free JVP + one batched forward"),
    ("meanflow:target_fp32=false", "MeanFlow default, JVP under bf16 autocast"),
    ("meanflow:jvp_kernel=explicit", "MeanFlow JVP on r≠t only (explicit attention)"),
    ("meanflow:jvp_only_r_neq_t=false,jvp_kernel=explicit", "MeanFlow plain JVP (baseline)"),
)
DEFAULT_MEANFLOW = ("meanflow", "meanflow:jvp_pass=separate", "meanflow:target_fp32=false")  # checked vs targets
GENERIC_OBJECTIVES = ("meanflow", "improved_meanflow", "scm")  # compared through objective.loss(...)

SIZES = {
    "full": {
        "numerics": dict(backbone="dit", kwargs=dict(depth=2, hidden_size=128, num_heads=4, patch_size=2),
                         shape=(4, 16, 16), batch=8, num_classes=10),
        "bench": dict(backbone="dit_b_2", shape=(4, 32, 32), batch=256, min_batch=8, steps=10, warmup=3,
                      precision="bf16", compile_backend="inductor"),
        "sampling": dict(models=(("dit_b_2", "DiT-B/2", {}), ("dit_xl_2", "DiT-XL/2", {})), shape=(4, 32, 32),
                         num_classes=1000, batch=256, min_batch=8, warmup=2, iters=10),
        "distributed": dict(
            toy=["train.steps=300"],
            digits=["train.steps=200", "eval.every=100", "eval.num_samples=500"],
            timeouts=dict(smoke=60, toy=150, digits=200)),
    },
    "tiny": {
        "numerics": dict(backbone="dit", kwargs=dict(depth=2, hidden_size=32, num_heads=2, patch_size=2),
                         shape=(4, 8, 8), batch=4, num_classes=10),
        "bench": dict(backbone="test_dit", shape=(4, 8, 8), batch=4, min_batch=1, steps=2, warmup=1,
                      precision="bf16", compile_backend="eager"),
        "sampling": dict(models=(("test_dit", "test_dit", {}),
                                 ("dit", "dit depth 2 width 64", dict(depth=2, hidden_size=64, num_heads=2))),
                         shape=(4, 8, 8), num_classes=10, batch=4, min_batch=1, warmup=1, iters=2),
        "distributed": dict(
            toy=["train.steps=4", "train.batch_size=64", "backbone.width=32", "train.log_every=2"],
            digits=["train.steps=4", "train.batch_size=8", "train.log_every=2", "eval.every=2",
                    "eval.num_samples=30", "eval.batch_size=30", "eval.nfe=[1]", "backbone.depth=1",
                    "backbone.hidden_size=32", "backbone.num_heads=2"],
            timeouts=dict(smoke=60, toy=150, digits=200)),
    },
}


# ============================================================================ small helpers (stdlib)
def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tail(text: str, lines: int = 25, chars: int = 4000) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(pid: int, grace: float = 5.0, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group led by ``pid`` (a process this tool started with its own session),
    wait up to ``grace`` seconds for the leader (``proc``, reaped here) or the group to go, then
    SIGKILL whatever is left of the group."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    else:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_process(cmd: list[str], timeout: float, *, cwd: Path = ROOT, env: dict | None = None,
                log_dir: Path, name: str, children_file: Path | None = None) -> dict:
    """Run ``cmd`` in its own session with a timeout (killing its whole process group on expiry).

    stdout/stderr go to files (no pipe to fill up); returns rc (None on timeout), timed_out, wall_s,
    stdout, stderr. ``children_file`` gets the pid when it starts and -pid once it is gone, so
    whoever kills us can kill what we left running.
    """
    out_path, err_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    t0 = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        if children_file is not None:
            with open(children_file, "a") as f:
                f.write(f"{proc.pid}\n")
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(proc.pid, proc=proc)
            proc.wait()
            rc, timed_out = None, True
        finally:
            if proc.poll() is None:  # interrupted while waiting
                kill_group(proc.pid, grace=2.0, proc=proc)
        # Leftovers of the group (e.g. torchrun workers) after a normal exit.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if children_file is not None:
            with open(children_file, "a") as f:
                f.write(f"-{proc.pid}\n")  # done: nothing of this group is left to kill
    return {"rc": rc, "timed_out": timed_out, "wall_s": round(time.monotonic() - t0, 2),
            "stdout": read_text(out_path), "stderr": read_text(err_path)}


def failure_tail(stderr: str, lines: int = 15) -> str:
    """The informative end of a failed command's stderr: for torchrun, what the workers printed
    before the launcher's own report (which starts at its "failed (exitcode" line)."""
    kept = stderr.splitlines()
    cut = next((i for i, line in enumerate(kept) if "failed (exitcode" in line), None)
    if cut:
        kept = kept[:cut]
    return tail("\n".join(kept), lines)


def json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


# ============================================================================ worker side
class Result:
    """A part's result dict, saved atomically to its file on every ``save()`` (the parent reads it
    even when it had to kill the worker)."""

    def __init__(self, path: Path):
        self.path, self.data = path, {"status": "running"}

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1, default=str))

    def __setitem__(self, key, value) -> None:
        self.data[key] = value
        self.save()

    def __getitem__(self, key):
        return self.data[key]


class Worker:
    def __init__(self, spec: dict, result: Result):
        self.spec, self.result = spec, result
        self.device = spec["device"]
        self.tiny = spec["tiny"]
        self.sizes = SIZES["tiny" if self.tiny else "full"]
        self.deadline = spec["deadline"]  # time.time() by which this part must be done
        self.work = Path(spec["work_dir"])
        self.children = Path(spec["children_file"])

    def left(self, margin: float = 3.0) -> float:
        return self.deadline - time.time() - margin

    def sub(self, cmd: list[str], timeout: float, name: str, env: dict | None = None) -> dict:
        return run_process(cmd, min(timeout, self.left()), env=env, log_dir=self.work, name=name,
                           children_file=self.children)


def _torch_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available on this machine (torch "
                           f"{torch.__version__}, built for CUDA {torch.version.cuda})")
    return torch.device("cuda", 0) if name == "cuda" else torch.device(name)


def is_oom(exc: BaseException) -> bool:
    import torch

    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- 1. environment
def part_environment(w: Worker) -> None:
    import importlib.metadata as md
    import platform

    import torch

    info: dict = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
                  "cuda_build": torch.version.cuda, "device_requested": w.device}
    import onestep

    info["onestep"] = f"{onestep.__version__} ({Path(onestep.__file__).resolve().parent})"
    for pkg in ("torchvision", "timm", "triton", "numpy"):
        with contextlib.suppress(Exception):
            info[f"{pkg}_version"] = md.version(pkg)
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    info["cpu_count"] = os.cpu_count()
    with contextlib.suppress(Exception):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(Exception):
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in read_text(Path("/proc/cpuinfo")).splitlines()
                                 if line.startswith("model name"))
    with contextlib.suppress(Exception):
        kb = next(int(line.split()[1]) for line in read_text(Path("/proc/meminfo")).splitlines()
                  if line.startswith("MemTotal"))
        info["host_memory_gib"] = round(kb / 2**20, 1)
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    with contextlib.suppress(Exception):
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    info["cuda_available"] = torch.cuda.is_available()
    info["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32,
                    "float32_matmul_precision": torch.get_float32_matmul_precision()}
    info["sdpa_enabled"] = {
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "math": torch.backends.cuda.math_sdp_enabled(),
        "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)()}
    w.result["info"] = info
    if w.device == "cuda" or torch.cuda.is_available():
        with contextlib.suppress(Exception):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:300]
    if torch.cuda.is_available():
        info["device_count"] = torch.cuda.device_count()
        info["gpus"] = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
        free, _ = torch.cuda.mem_get_info(0)
        info["memory_free_gib"] = round(free / 2**30, 1)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        with contextlib.suppress(Exception):
            info["driver_cuda"] = torch._C._cuda_getDriverVersion()
    else:
        info["device_count"] = 0
    w.result["info"] = info
    device = _torch_device(w.device)
    info["sdpa_runs"] = sdpa_probe(device)
    info["sdpa_runs_summary"] = sdpa_summary(info["sdpa_runs"])
    w.result["info"] = info
    w.result["status"] = "ok"


def sdpa_probe(device) -> dict:
    """Which SDPA backends run one (2, 4, 256, 64) call on ``device``: {backend: {dtype: "ok" or why not}}."""
    import warnings

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "mem_efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["cudnn"] = SDPBackend.CUDNN_ATTENTION
    out = {name: {} for name in backends}
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(2, 4, 256, 64, device=device, dtype=dtype)
        for name, backend in backends.items():
            key = str(dtype).replace("torch.", "")
            try:
                with warnings.catch_warnings(), sdpa_kernel(backend):
                    warnings.simplefilter("ignore")
                    F.scaled_dot_product_attention(q, q, q)
                _sync(device)
                out[name][key] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means "does not run here"
                text = str(exc).strip()
                out[name][key] = "no: " + (text.splitlines()[0][:120] if text else type(exc).__name__)
    return out


def sdpa_summary(runs: dict) -> str:
    """'flash: bf16 ok, fp32 no; ...' from ``sdpa_probe``."""
    short = {"bfloat16": "bf16", "float32": "fp32"}
    return "; ".join(f"{name}: " + ", ".join(f"{short.get(k, k)} {'ok' if v == 'ok' else 'no'}" for k, v in d.items())
                     for name, d in runs.items())


# ---------------------------------------------------------------------------- 2. numerics
def randomized_net(spec: dict, **extra):
    """The numerics DiT in float64 on the CPU with every parameter random (DiT zero-initialises its
    adaLN and output layers, which would leave most gradients zero). ``extra``: more backbone kwargs
    (``guidance_conditions=True`` for objectives that need guidance inputs)."""
    import torch

    from onestep.registry import BACKBONES

    torch.manual_seed(0)
    net = BACKBONES.build(spec["backbone"], input_shape=list(spec["shape"]), num_classes=spec["num_classes"],
                          **spec["kwargs"], **extra)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net.double().eval()


def numerics_inputs(spec: dict):
    """Fixed float32 (x, y, e, t, r) on the CPU: half the samples with r = t, one null label."""
    import torch

    g = torch.Generator().manual_seed(1)
    batch, shape, classes = spec["batch"], tuple(spec["shape"]), spec["num_classes"]
    x = torch.randn(batch, *shape, generator=g)
    e = torch.randn(batch, *shape, generator=g)
    t = 0.05 + 0.9 * torch.rand(batch, generator=g)
    r = t * torch.rand(batch, generator=g)
    r[::2] = t[::2]
    y = torch.randint(0, classes, (batch,), generator=g)
    y[0] = classes  # the null label (a dropped sample)
    return x, y, e, t, r


def meanflow_dudt(objective, net, x, y, e, t, r):
    """du/dt as ``MeanFlow.loss_given`` forms it (same precision rules), without the loss."""
    import torch

    dtype = torch.promote_types(torch.float32 if objective.target_fp32 else x.dtype, x.dtype)
    precision = (torch.autocast(device_type=x.device.type, enabled=False) if objective.target_fp32
                 else contextlib.nullcontext())
    with precision:
        x, e = x.to(dtype), e.to(dtype)
        t, r = t.to(dtype), r.to(dtype)
        tt = t.view(-1, *([1] * (x.ndim - 1)))
        z = (1 - tt) * x + tt * e
        v_tilde, _ = objective.guided_velocity(net, z, t, e - x, y)
        _, dudt, _ = objective.u_and_dudt(net, z, t, r, v_tilde, y)
    return dudt


def evaluate_loss(fn, net, device, autocast_bf16: bool, with_dudt=None) -> dict:
    """loss (B,), the gradients of its mean (one flat float64 CPU vector) and du/dt, from ``fn(net)``."""
    import torch

    net.zero_grad(set_to_none=True)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    with ctx:
        out = fn(net)
    loss = out.loss
    (loss if loss.dtype == torch.float64 else loss.float()).mean().backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double().cpu()
                       for p in net.parameters()])
    res = {"loss": loss.detach().double().cpu(), "grads": grads}
    if with_dudt is not None:
        with torch.no_grad(), ctx:
            res["dudt"] = with_dudt(net).detach().double().cpu()
    return res


def compare(a: dict, ref: dict, mask=None) -> dict:
    def rel_max(x, r):
        d = (x - r).abs().max().item()
        return d, d / max(r.abs().max().item(), 1e-30)

    out = {}
    out["loss_abs"], out["loss_rel"] = rel_max(a["loss"], ref["loss"])
    out["grad_abs"] = (a["grads"] - ref["grads"]).abs().max().item()
    out["grad_rel"] = ((a["grads"] - ref["grads"]).norm() / ref["grads"].norm().clamp_min(1e-30)).item()
    if "dudt" in a and "dudt" in ref:
        x, r = (a["dudt"], ref["dudt"]) if mask is None else (a["dudt"][mask], ref["dudt"][mask])
        out["dudt_abs"], out["dudt_rel"] = rel_max(x, r)
    finite = all(bool(v.isfinite().all()) for v in a.values())
    return {k: float(f"{v:.3e}") for k, v in out.items()} | {"finite": finite}


def within(errors: dict, tol: dict) -> bool:
    return errors.get("finite", True) and all(errors[f"{k}_rel"] <= tol[k] for k in tol if f"{k}_rel" in errors)


@contextlib.contextmanager
def cpu_random(seed: int):
    """Every random draw of ``torch`` (functions and Tensor methods used by objectives) made from one
    seeded CPU generator in float32 and then moved/cast to the requested device and dtype: the same
    code on a GPU and on the CPU (in float64) sees the same noise, times and label drops."""
    import torch

    g = torch.Generator().manual_seed(seed)
    names = ("randn", "rand", "randint", "randperm", "randn_like", "rand_like", "randint_like", "multinomial",
             "bernoulli", "normal")
    saved = {n: getattr(torch, n) for n in names}
    saved_methods = {n: getattr(torch.Tensor, n) for n in ("normal_", "uniform_")}

    def target(kw, like=None):
        device = kw.pop("device", None) or (like.device if like is not None else None)
        dtype = kw.pop("dtype", None) or (like.dtype if like is not None else None)
        grad = kw.pop("requires_grad", False)
        for k in ("generator", "layout", "pin_memory", "memory_format", "out"):
            kw.pop(k, None)
        return device, dtype, grad

    def finish(x, device, dtype, grad):
        x = x.to(device=device if device is not None else x.device, dtype=dtype if dtype is not None else x.dtype)
        return x.requires_grad_() if grad else x

    def floating(fn):
        def draw(*size, **kw):
            device, dtype, grad = target(kw)
            return finish(saved[fn](*size, generator=g, dtype=torch.float32),
                          device, dtype or torch.get_default_dtype(), grad)
        return draw

    def like(fn):
        def draw(x, **kw):
            device, dtype, grad = target(kw, x)
            return finish(saved[fn](tuple(x.shape), generator=g, dtype=torch.float32), device, dtype, grad)
        return draw

    def randint(*args, **kw):
        device, dtype, grad = target(kw)
        return finish(saved["randint"](*args, generator=g), device, dtype, grad)

    def randint_like(x, *args, **kw):
        device, dtype, grad = target(kw, x)
        return finish(saved["randint"](*args, tuple(x.shape), generator=g), device, dtype, grad)

    def randperm(n, **kw):
        device, dtype, grad = target(kw)
        return finish(saved["randperm"](n, generator=g), device, dtype, grad)

    def multinomial(probs, num_samples, replacement=False, **kw):
        kw.pop("generator", None)
        cpu_probs = probs.detach().double().cpu()
        return saved["multinomial"](cpu_probs, num_samples, replacement, generator=g).to(probs.device)

    def bernoulli(p, *args, **kw):
        kw.pop("generator", None)
        if args or "p" in kw:
            prob = args[0] if args else kw["p"]
        else:
            prob = p
        prob = prob.detach().double().cpu() if torch.is_tensor(prob) else prob
        return (saved["rand"](tuple(p.shape), generator=g, dtype=torch.float32).double() < prob).to(p)

    def normal(mean, std=1.0, *args, **kw):
        device, dtype, grad = target(kw)
        if torch.is_tensor(mean) or torch.is_tensor(std):
            ref = mean if torch.is_tensor(mean) else std
            shape = torch.broadcast_shapes(tuple(getattr(mean, "shape", ())), tuple(getattr(std, "shape", ())))
            return mean + std * saved["randn"](shape, generator=g, dtype=torch.float32).to(ref.device, ref.dtype)
        size = args[0] if args else kw.pop("size")
        draw = saved["randn"](tuple(size), generator=g, dtype=torch.float32)
        return finish(mean + std * draw, device, dtype or torch.get_default_dtype(), grad)

    def normal_(self, mean=0.0, std=1.0, *, generator=None):
        with torch.no_grad():
            return self.copy_(saved["randn"](tuple(self.shape), generator=g, dtype=torch.float32) * std + mean)

    def uniform_(self, a=0.0, b=1.0, *, generator=None):
        with torch.no_grad():
            return self.copy_(saved["rand"](tuple(self.shape), generator=g, dtype=torch.float32) * (b - a) + a)

    patched = {"randn": floating("randn"), "rand": floating("rand"), "randint": randint, "randperm": randperm,
               "randn_like": like("randn"), "rand_like": like("rand"), "randint_like": randint_like,
               "multinomial": multinomial, "bernoulli": bernoulli, "normal": normal}
    try:
        for n, fn in patched.items():
            setattr(torch, n, fn)
        torch.Tensor.normal_, torch.Tensor.uniform_ = normal_, uniform_
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch, n, fn)
        for n, fn in saved_methods.items():
            setattr(torch.Tensor, n, fn)


GENERIC_CHECK = "objective.loss, CPU-drawn randomness"


def generic_objective_rows(name: str, ref_net, x, y, device) -> list[dict]:
    """``OBJECTIVES.build(name).loss(net, x, y, step=0)`` on ``device`` (fp32, and under bf16
    autocast) against float64 on the CPU, every random draw from the CPU (``cpu_random``); with
    fused and explicit attention when the objective takes ``jvp_kernel``. ``ref_net``: float64 CPU."""
    import copy
    import inspect

    import torch

    from onestep.registry import OBJECTIVES

    y = y.clone()
    classes = getattr(ref_net, "num_classes", 0)
    if classes:
        y[y >= classes] = 0  # loss() drops labels itself: give it kept ones
    rows = []

    def call(kernel, xx, yy):
        def fn(net):
            with cpu_random(1234):
                return OBJECTIVES.build(name, **({"jvp_kernel": kernel} if kernel else {})).loss(net, xx, yy, step=0)
        return fn

    try:
        kernels = ("fused", "explicit") if "jvp_kernel" in inspect.signature(OBJECTIVES.get(name)).parameters \
            else (None,)
        ref = evaluate_loss(call(kernels[-1], x.double(), y), ref_net, torch.device("cpu"), False)
    except Exception:  # noqa: BLE001 - recorded
        return [{"check": GENERIC_CHECK, "objective": name, "pass": False, "error": tail(traceback.format_exc(), 8)}]
    for precision in ("fp32", "bf16"):
        for kernel in kernels:
            row = {"check": GENERIC_CHECK, "objective": name, "precision": precision, "kernel": kernel or "default",
                   "tolerance": TOLERANCES[precision]}
            try:
                net = copy.deepcopy(ref_net).to(device=device, dtype=torch.float32)
                got = evaluate_loss(call(kernel, x.to(device), y.to(device)), net, device, precision == "bf16")
                row["vs_float64"] = compare(got, ref)
                row["pass"] = within(row["vs_float64"], TOLERANCES[precision])
            except Exception:  # noqa: BLE001
                row["error"], row["pass"] = tail(traceback.format_exc(), 8), False
            rows.append(row)
    return rows


def part_numerics(w: Worker) -> None:
    import copy

    import torch

    from onestep.objectives.meanflow import MeanFlow
    from onestep.registry import OBJECTIVES

    device = _torch_device(w.device)
    if device.type == "cuda":  # fp32 must mean fp32 here
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    spec = w.sizes["numerics"]
    ref_net = randomized_net(spec)
    x, y, e, t, r = numerics_inputs(spec)
    moving = t != r
    # Guidance folded in (the B/2 and digits setting); adaptive_p=0: the loss is the plain sum of
    # squares l, not l / sg(l + c) (which sits near 1 and hides errors in l).
    mf = dict(cfg_omega=1.0, cfg_kappa=0.5, adaptive_p=0.0)
    w.result["setup"] = {"backbone": spec["backbone"], **spec["kwargs"], "input_shape": list(spec["shape"]),
                         "batch": spec["batch"], "num_classes": spec["num_classes"], "meanflow": mf,
                         "r_neq_t": int(moving.sum()), "device": str(device), "tf32": False,
                         "tolerances": TOLERANCES}
    rows = []
    w.result["rows"] = rows

    def on_device(dtype_net):
        return copy.deepcopy(ref_net).to(device=device, dtype=dtype_net)

    # Float64 CPU reference: the plain path (whole-batch JVP, explicit softmax).
    ref_obj = MeanFlow(jvp_kernel="explicit", jvp_only_r_neq_t=False, **mf)
    args64 = [a.double() if a.is_floating_point() else a for a in (x, y, e, t, r)]

    def mf_fn(obj, args):
        xx, yy, ee, tt, rr = args
        return (lambda net: obj.loss_given(net, xx, yy, e=ee, t=tt, r=rr),
                lambda net: meanflow_dudt(obj, net, xx, yy, ee, tt, rr))

    loss_fn, dudt_fn = mf_fn(ref_obj, args64)
    ref = evaluate_loss(loss_fn, ref_net, torch.device("cpu"), False, dudt_fn)
    args_dev = [a.to(device) for a in (x, y, e, t, r)]
    cases = [("fp32", True), ("bf16", True), ("bf16", False)]
    for precision, target_fp32 in cases:
        per_kernel = {}
        for kernel in ("fused", "explicit", "sdpa_math"):
            row = {"check": "meanflow loss_given", "objective": "meanflow", "precision": precision,
                   "target_fp32": target_fp32, "kernel": kernel, "tolerance": TOLERANCES[precision]}
            try:
                obj = MeanFlow(jvp_kernel=kernel, target_fp32=target_fp32, **mf)
                loss_fn, dudt_fn = mf_fn(obj, args_dev)
                got = evaluate_loss(loss_fn, on_device(torch.float32), device, precision == "bf16", dudt_fn)
                per_kernel[kernel] = got
                row["vs_float64"] = compare(got, ref, moving)
                if kernel != "explicit" and "explicit" in per_kernel:
                    row["vs_explicit"] = compare(got, per_kernel["explicit"], moving)
                row["pass"] = within(row["vs_float64"], TOLERANCES[precision]) and \
                    within(row.get("vs_explicit", {}), TOLERANCES[precision])
            except Exception:  # noqa: BLE001 - recorded, the other cases go on
                row["error"], row["pass"] = tail(traceback.format_exc(), 8), False
            rows.append(row)
            w.result.save()
        # fused was measured before explicit: compare it now that explicit exists.
        fused_row = next(rw for rw in rows[-3:] if rw["kernel"] == "fused")
        if "fused" in per_kernel and "explicit" in per_kernel:
            fused_row["vs_explicit"] = compare(per_kernel["fused"], per_kernel["explicit"], moving)
            fused_row["pass"] = fused_row["pass"] and within(fused_row["vs_explicit"], TOLERANCES[precision])
    # Other JVP objectives (and meanflow as the control of the method) through objective.loss(...).
    names = OBJECTIVES.names()
    others = [n for n in names if n not in GENERIC_OBJECTIVES and getattr(OBJECTIVES.get(n), "uses_jvp", False)]
    for name in (*GENERIC_OBJECTIVES, *others):
        if name not in names:
            rows.append({"check": GENERIC_CHECK, "objective": name, "status": "not present", "pass": None})
            w.result.save()
            continue
        net_for = ref_net
        try:
            OBJECTIVES.build(name).check_backbone(ref_net)
        except ValueError:  # e.g. improved_meanflow: the backbone needs guidance inputs
            net_for = randomized_net(spec, guidance_conditions=True)
        for row in generic_objective_rows(name, net_for, x, y, device):
            rows.append(row)
            w.result.save()
    failed = [f"{rw['objective']} {rw.get('precision', '')} {rw.get('kernel', '')}".strip()
              for rw in rows if rw.get("pass") is False]
    w.result["checks"] = {"all_within_tolerance": not failed}
    if failed:
        w.result["error"] = "outside tolerance or raised: " + "; ".join(failed)
    w.result["status"] = "ok" if not failed else "failed"


# ---------------------------------------------------------------------------- 3. / 6. bench
def oom_halving(objectives: list[str], batch: int, min_batch: int, run) -> tuple[list[dict], str | None]:
    """Rows for ``objectives`` at ``batch``, halving the batch for those that ran out of memory.

    ``run(objectives, batch) -> (rows, error)``: one tools/bench.py call; rows carry ``objective``
    and, for an allocation failure, ``"error": "out of memory"``. Each rerun includes flow matching
    (first) so the ratios at the smaller batch have their reference. An objective with no row and no
    out-of-memory error ends the search (the call failed: ``error`` says how)."""
    rows: list[dict] = []
    todo = list(objectives)
    while todo:
        call = (["flow_matching"] if "flow_matching" in objectives and "flow_matching" not in todo else []) + todo
        got, error = run(call, batch)
        rows += got
        by_obj = {r["objective"]: r for r in got}
        oom = [o for o in todo if by_obj.get(o, {}).get("error") == "out of memory"
               or (o not in by_obj and error and "out of memory" in error)]
        missing = [o for o in todo if o not in by_obj and o not in oom]
        if missing:
            return rows, error or f"no row for {', '.join(missing)}"
        todo = oom
        batch //= 2
        if todo and batch < min_batch:
            return rows, f"out of memory down to batch {batch * 2}: {', '.join(todo)}"
    return rows, None


def part_bench(w: Worker, compiled: bool = False) -> None:
    s = w.sizes["bench"]
    objectives = [o for o, _ in BENCH_OBJECTIVES]
    if compiled:  # by importance: the rows the targets check come first
        objectives = ["flow_matching", *DEFAULT_MEANFLOW] + [o for o in objectives
                                                              if o not in ("flow_matching", *DEFAULT_MEANFLOW)]
    calls = []
    w.result["calls"] = calls
    w.result["setup"] = {"backbone": s["backbone"], "input_shape": list(s["shape"]), "batch": s["batch"],
                         "precision": s["precision"], "steps": s["steps"], "warmup": s["warmup"],
                         "compile": compiled, "compile_backend": s["compile_backend"] if compiled else None}
    rows: list[dict] = []
    w.result["rows"] = rows

    def run(objs: list[str], batch: int):
        cmd = [sys.executable, str(BENCH), "--backbones", s["backbone"], "--input-shape",
               ",".join(map(str, s["shape"])), "--batch", str(batch), "--objectives", ";".join(objs),
               "--steps", str(s["steps"]), "--warmup", str(s["warmup"]), "--device", w.device,
               "--precision", s["precision"], "--json", "--skip-oom"]
        if compiled:  # streamed, so a timeout keeps the rows that finished
            cmd += ["--compile", "on", "--compile-backend", s["compile_backend"], "--stream"]
        out = w.sub(cmd, w.left(), f"bench_{'compile_' if compiled else ''}{batch}")
        got = [r for r in json_lines(out["stdout"]) if "objective" in r]
        for r in got:
            r["label"] = dict(BENCH_OBJECTIVES).get(r["objective"], r["objective"])
        rows.extend(got)
        error = None
        if out["timed_out"]:
            error = f"bench timed out after {out['wall_s']} s (batch {batch})"
        elif out["rc"] != 0:
            error = f"bench exit {out['rc']}: {failure_tail(out['stderr'])}"
        calls.append({"batch": batch, "objectives": objs, "rc": out["rc"], "timed_out": out["timed_out"],
                      "wall_s": out["wall_s"], "error": error})
        w.result.save()
        return got, error

    _, error = oom_halving(objectives, s["batch"], s["min_batch"], run)
    for r in rows:
        if r["objective"] in DEFAULT_MEANFLOW and r.get("ratio_to_flow_matching") is not None:
            r["time_target_met"] = r["ratio_to_flow_matching"] <= TARGET_TIME_RATIO
            r["mem_target_met"] = (r["mem_ratio_to_flow_matching"] <= TARGET_MEM_RATIO
                                   if r.get("mem_ratio_to_flow_matching") is not None else None)
    measured = {r["objective"] for r in rows if r.get("ms_per_step")}
    w.result["targets"] = {"time_ratio_max": TARGET_TIME_RATIO, "mem_ratio_max": TARGET_MEM_RATIO,
                           "rows": [{k: r.get(k) for k in ("objective", "batch", "compile", "ratio_to_flow_matching",
                                                           "mem_ratio_to_flow_matching", "time_target_met",
                                                           "mem_target_met")}
                                    for r in rows if r["objective"] in DEFAULT_MEANFLOW and r.get("ms_per_step")]}
    if error:
        w.result["error"] = error
    w.result["status"] = "ok" if not error and measured >= set(objectives) else ("partial" if measured else "failed")


# ---------------------------------------------------------------------------- 4. sampling
def part_sampling(w: Worker) -> None:
    import torch

    from onestep.registry import OBJECTIVES
    from onestep.sampling import sample

    device = _torch_device(w.device)
    s = w.sizes["sampling"]
    rows = []
    w.result["setup"] = {"input_shape": list(s["shape"]), "num_classes": s["num_classes"], "nfe": 1,
                         "precision": "bf16 autocast", "objective": "meanflow", "warmup": s["warmup"],
                         "iters": s["iters"], "weights": "random (speed only)"}
    w.result["rows"] = rows
    objective = OBJECTIVES.build("meanflow")
    for name, label, kwargs in s["models"]:
        batch = s["batch"]
        while True:
            row = {"backbone": name, "label": label, "batch": batch, "nfe": 1}
            try:
                row.update(sampling_speed(name, kwargs, s, batch, device, objective, sample))
                rows.append(row)
                break
            except Exception as exc:  # noqa: BLE001
                oom = is_oom(exc)
                row["error"] = "out of memory" if oom else tail(traceback.format_exc(), 8)
            rows.append(row)
            w.result.save()
            import gc

            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if row["error"] != "out of memory" or batch // 2 < s["min_batch"]:
                break
            batch //= 2
        w.result.save()
    ok = {r["backbone"] for r in rows if r.get("images_per_s")}
    wanted = {m[0] for m in s["models"]}
    if ok != wanted:
        w.result["error"] = "; ".join(f"{r['backbone']} batch {r['batch']}: {r['error']}" for r in rows if "error" in r)
    w.result["status"] = "ok" if ok == wanted else ("partial" if ok else "failed")


def sampling_speed(name, kwargs, s, batch, device, objective, sample) -> dict:
    import torch

    from onestep.registry import BACKBONES

    torch.manual_seed(0)
    with torch.device(device):
        net = BACKBONES.build(name, input_shape=list(s["shape"]), num_classes=s["num_classes"], **kwargs)
    net = net.to(device).eval()
    noise = torch.randn(batch, *s["shape"], device=device)
    y = torch.randint(0, s["num_classes"], (batch,), device=device)
    ctx = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    for _ in range(s["warmup"]):
        with ctx():
            sample(objective, net, noise, y, nfe=1)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    for _ in range(s["iters"]):
        with ctx():
            out = sample(objective, net, noise, y, nfe=1)
    _sync(device)
    elapsed = time.perf_counter() - t0
    row = {"params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
           "ms_per_batch": round(1000 * elapsed / s["iters"], 2),
           "images_per_s": round(s["iters"] * batch / elapsed, 1), "finite": bool(torch.isfinite(out).all()),
           "peak_mem_mb": None, "peak_total_mb": None}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_mem_mb"] = round((peak - base) / 2**20, 1)  # above the weights and inputs
        row["peak_total_mb"] = round(peak / 2**20, 1)
    del net, out
    return row


# ---------------------------------------------------------------------------- 5. distributed
def dist_smoke(device_name: str) -> int:
    """Run by torchrun: a process group on NCCL (cuda) or gloo (cpu), a few collectives and onestep's
    own helpers; rank 0 prints one JSON line."""
    import torch
    import torch.distributed as dist

    from onestep.utils import distributed

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    t0 = time.perf_counter()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    x = torch.full((1 << 20,), float(rank + 1), device=device)
    dist.all_reduce(x)
    _sync(device)
    init_s = time.perf_counter() - t0  # includes the first collective (NCCL connects lazily)
    all_reduce_ok = bool((x == world * (world + 1) / 2).all())
    rows = torch.full((2, 3), float(rank), device=device)
    gathered = torch.empty(2 * world, 3, device=device)
    dist.all_gather_into_tensor(gathered, rows)
    all_gather_ok = bool((gathered.view(world, 2, 3) == torch.arange(world, device=device).view(-1, 1, 1)).all())
    obj = distributed.broadcast_object({"from": rank})
    t1 = time.perf_counter()
    big = torch.ones(16 << 20, device=device)  # 64 MiB fp32
    for _ in range(5):
        dist.all_reduce(big)
    _sync(device)
    allreduce_ms = 1000 * (time.perf_counter() - t1) / 5
    distributed.shutdown()
    if rank == 0:
        print(json.dumps({"backend": "nccl" if cuda else "gloo", "world_size": world, "init_s": round(init_s, 3),
                          "all_reduce_ok": all_reduce_ok, "all_gather_ok": all_gather_ok,
                          "broadcast_object_ok": obj == {"from": 0}, "all_reduce_64mib_ms": round(allreduce_ms, 2),
                          "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None}), flush=True)
    return 0


def part_distributed(w: Worker) -> None:
    s = w.sizes["distributed"]
    env_info = (w.spec.get("context") or {}).get("environment") or {}
    nproc = w.spec.get("nproc") or (env_info.get("device_count") if w.device == "cuda" else 1) or 1
    keep = w.spec.get("keep_runs")
    runs_root = Path(tempfile.mkdtemp(prefix="onestep_gpu_check_runs_"))
    env = dict(os.environ)
    if w.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    rows = []
    w.result["setup"] = {"nproc_per_node": nproc, "backend": "nccl" if w.device == "cuda" else "gloo",
                         "runs_root": str(runs_root) if keep else "(temporary, removed)"}
    w.result["rows"] = rows
    problems = []

    # Process group smoke test (torchrun with one process never builds a process group in the trainer).
    out = w.sub(launcher + ["--master_port", str(free_port()), str(TOOL), "--_dist-smoke", w.device],
                s["timeouts"]["smoke"] * w.spec.get("timeout_scale", 1.0), "dist_smoke", env)
    info = (json_lines(out["stdout"]) or [{}])[-1]
    ok = out["rc"] == 0 and info.get("all_reduce_ok") and info.get("all_gather_ok") and info.get("broadcast_object_ok")
    rows.append({"run": "process group smoke", "nproc": nproc, "wall_s": out["wall_s"], "ok": bool(ok), **info,
                 **({} if ok else {"error": "timed out" if out["timed_out"] else failure_tail(out["stderr"])})})
    if not ok:
        problems.append("process group smoke")
    w.result.save()

    device_overrides = ["train.device=cpu"] if w.device == "cpu" else []
    for key, recipe in (("toy", "recipes/toy_meanflow.yaml"), ("digits", "recipes/digits_meanflow.yaml")):
        run_dir = runs_root / key
        overrides = list(s[key]) + device_overrides
        cmd = launcher + ["--master_port", str(free_port()), "-m", "onestep", "train", recipe,
                          "--run-dir", str(run_dir), "--no-progress", *overrides]
        out = w.sub(cmd, s["timeouts"][key] * w.spec.get("timeout_scale", 1.0), f"dist_{key}", env)
        row = {"run": f"{Path(recipe).stem} via torchrun", "nproc": nproc, "overrides": overrides,
               "wall_s": out["wall_s"], "rc": out["rc"], "timed_out": out["timed_out"]}
        lines = out["stdout"].strip().splitlines()
        row["last_line_is_run_dir"] = bool(lines) and lines[-1].strip() == str(run_dir)
        ckpt = run_dir / "checkpoints" / "last.pt"
        row["checkpoint"] = ckpt.is_file() and ckpt.stat().st_size > 0
        stats = json_lines(read_text(run_dir / "stats.jsonl"))
        if stats:
            last = stats[-1]
            row["final_step"] = last.get("step")
            row["final"] = {k: last[k] for k in ("loss", "mse", "steps_per_s", "images_per_s", "time_s") if k in last}
        steps = next((int(o.split("=")[1]) for o in overrides if o.startswith("train.steps=")), None)
        row["steps"] = steps
        ok = out["rc"] == 0 and row["last_line_is_run_dir"] and row["checkpoint"] and row.get("final_step") == steps
        if key == "digits":
            metrics = json_lines(read_text(run_dir / "metrics.jsonl"))
            every = next(int(o.split("=")[1]) for o in overrides if o.startswith("eval.every="))
            eval_steps = sorted({m.get("step") for m in metrics})
            row["metrics_rows"] = len(metrics)
            row["eval_steps"] = eval_steps
            final_step = max(eval_steps) if eval_steps else None
            row["final_metrics"] = {f"{m['metric']}@{m['nfe']}": round(m["value"], 5) for m in metrics
                                    if m.get("step") == final_step}
            ok = ok and eval_steps == list(range(every, steps + 1, every))
        row["ok"] = bool(ok)
        if not ok:
            row["error"] = "timed out" if out["timed_out"] else failure_tail(out["stderr"]) or "checks failed"
            problems.append(key)
        rows.append(row)
        w.result.save()
    if keep:
        w.result["runs_root"] = str(runs_root)
    else:
        import shutil

        shutil.rmtree(runs_root, ignore_errors=True)
    if problems:
        w.result["error"] = "failed: " + ", ".join(problems)
    w.result["status"] = "ok" if not problems else ("partial" if len(problems) < len(rows) else "failed")


WORKERS = {"environment": part_environment, "numerics": part_numerics, "bench": part_bench,
           "sampling": part_sampling, "distributed": part_distributed,
           "bench_compile": lambda w: part_bench(w, compiled=True)}


def worker_main(part: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = Result(Path(spec["result_file"]))
    result.save()
    fail = spec.get("fail")
    if fail == "hang":
        time.sleep(10**6)
    if fail == "error":
        raise RuntimeError(f"injected failure in part '{part}' (--fail-part)")
    WORKERS[part](Worker(spec, result))
    return 0


# ============================================================================ parent side
def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def target_mark(r: dict) -> str:
    if r.get("time_target_met") is None:
        return ""
    t = "time ✓" if r["time_target_met"] else "time ✗"
    m = "" if r.get("mem_target_met") is None else (" mem ✓" if r["mem_target_met"] else " mem ✗")
    return t + m


def render_part(name: str, rec: dict) -> str:
    res = rec.get("result") or {}
    head = f"## {name}: {rec['status']}"
    if rec.get("wall_s") is not None:
        head += f" ({rec['wall_s']} s of {rec.get('timeout_s')} s allowed)"
    parts = [head]
    if rec.get("reason"):
        parts.append(rec["reason"])
    if name == "environment" and res.get("info"):
        info = res["info"]
        items = [(k, json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in info.items() if k != "sdpa_runs"]
        parts.append(md_table(["key", "value"], items))
    elif name == "numerics" and res.get("rows"):
        parts.append(f"Setup: {json.dumps(res.get('setup', {}))}")
        table = []
        for r in res["rows"]:
            a, b = r.get("vs_float64", {}), r.get("vs_explicit", {})
            tol = r.get("tolerance") or {}
            table.append(["loss_given" if r["check"] == "meanflow loss_given" else "loss(), CPU RNG",
                          r["objective"], r.get("precision"), r.get("target_fp32"), r.get("kernel"),
                          a.get("loss_abs"), a.get("loss_rel"), a.get("grad_abs"), a.get("grad_rel"),
                          a.get("dudt_rel"), b.get("loss_rel"), b.get("grad_rel"), b.get("dudt_rel"),
                          "/".join(fmt(tol.get(k)) for k in ("loss", "grad", "dudt")) if tol else None,
                          r.get("status") or ("pass" if r.get("pass") else "FAIL")
                          + (f": {tail(r['error'], 1)}" if r.get("error") else "")])
        parts.append(md_table(["path", "objective", "precision", "target_fp32", "kernel", "loss abs", "loss rel",
                               "grad abs", "grad rel", "du/dt rel", "vs explicit: loss rel", "grad rel", "du/dt rel",
                               "tol loss/grad/du/dt", "result"], table))
    elif name in ("bench", "bench_compile") and res.get("rows"):
        parts.append(f"Setup: {json.dumps(res.get('setup', {}))}")
        table = [[r.get("label", r["objective"]), r["objective"], r["batch"], r.get("compile"), r.get("ms_per_step"),
                  r.get("images_per_s"), r.get("peak_mem_mb"), r.get("ratio_to_flow_matching"),
                  r.get("mem_ratio_to_flow_matching"), r.get("error") or target_mark(r)] for r in res["rows"]]
        parts.append(md_table(["objective", "spec", "batch", "compile", "ms/step", "images/s", "peak MiB",
                               "time ratio", "mem ratio",
                               f"target (≤{TARGET_TIME_RATIO}×, ≤{TARGET_MEM_RATIO}×)"],
                              table))
    elif name == "sampling" and res.get("rows"):
        parts.append(f"Setup: {json.dumps(res.get('setup', {}))}")
        table = [[r.get("label"), r["batch"], r.get("params_m"), r.get("ms_per_batch"), r.get("images_per_s"),
                  r.get("peak_mem_mb"), r.get("peak_total_mb"),
                  r.get("error") or ("finite" if r.get("finite") else "NaN")]
                 for r in res["rows"]]
        parts.append(md_table(["backbone", "batch", "params M", "ms/batch", "images/s", "peak MiB (activations)",
                               "peak MiB (total)", "note"], table))
    elif name == "distributed" and res.get("rows"):
        parts.append(f"Setup: {json.dumps(res.get('setup', {}))}")
        table = []
        for r in res["rows"]:
            if r["run"] == "process group smoke":
                detail = {k: r.get(k) for k in ("backend", "world_size", "init_s", "all_reduce_64mib_ms", "nccl")}
            else:
                detail = {"steps": r.get("final_step"), "last line = run dir": r.get("last_line_is_run_dir"),
                          "checkpoint": r.get("checkpoint"), **(r.get("final") or {})}
                if "metrics_rows" in r:
                    detail.update({"metrics rows": r["metrics_rows"], "eval steps": r.get("eval_steps"),
                                   **(r.get("final_metrics") or {})})
            table.append([r["run"], r.get("nproc"), r.get("wall_s"), "ok" if r.get("ok") else "FAIL",
                          json.dumps(detail, ensure_ascii=False)
                          + (f" — {tail(r['error'], 3)}" if r.get("error") else "")])
        parts.append(md_table(["run", "nproc", "wall s", "result", "details"], table))
    if rec.get("error"):
        parts.append("Error:\n\n```\n" + rec["error"] + "\n```")
    return "\n\n".join(parts)


def render(report: dict) -> str:
    lines = [f"# onestep gpu_check — {report['device']}{' (tiny)' if report['tiny'] else ''}",
             "", f"Started {report['started']}, budget {report['budget_s']} s, elapsed {report.get('elapsed_s')} s"
             + ("" if report.get("finished") else " (in progress)") + ".", ""]
    lines.append(md_table(["part", "status", "wall s", "timeout s"],
                          [[p, rec["status"], rec.get("wall_s"), rec.get("timeout_s")]
                           for p, rec in report["parts"].items()]))
    out = "\n".join(lines)
    for p, rec in report["parts"].items():
        if rec["status"] not in ("pending",):
            out += "\n\n" + render_part(p, rec)
    return out + "\n"


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="onestep_gpu_check_"))
        self.t0 = time.monotonic()
        self.current: subprocess.Popen | None = None
        self.report = {"tool": "tools/gpu_check.py", "version": 1, "device": args.device, "tiny": args.tiny,
                       "budget_s": args.budget_s, "started": now_iso(), "finished": None, "elapsed_s": 0.0,
                       "argv": sys.argv[1:], "targets": {"time_ratio_max": TARGET_TIME_RATIO,
                                                         "mem_ratio_max": TARGET_MEM_RATIO},
                       "tolerances": TOLERANCES,
                       "parts": {p: {"status": "pending"} for p in PARTS if p in args.parts}}

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
            rec.update(status="skipped", reason=f"budget: {left:.0f} s left of {self.args.budget_s} s, "
                                                f"this part needs at least {MIN_SECONDS[part]} s")
            return
        timeout = min(self.args.timeouts.get(part, DEFAULT_TIMEOUTS[part] * self.args.timeout_scale), left)
        result_file, children = self.work / f"{part}.result.json", self.work / f"{part}.children"
        env_info = (self.report["parts"].get("environment", {}).get("result") or {}).get("info")
        spec = {"part": part, "device": self.args.device, "tiny": self.args.tiny, "deadline": time.time() + timeout,
                "work_dir": str(self.work), "result_file": str(result_file), "children_file": str(children),
                "fail": self.args.fail.get(part), "nproc": self.args.nproc, "timeout_scale": self.args.timeout_scale, "keep_runs": self.args.keep_runs,
                "context": {"environment": env_info}}
        spec_file = self.work / f"{part}.spec.json"
        spec_file.write_text(json.dumps(spec))
        rec.update(status="running", started=now_iso(), timeout_s=round(timeout, 1))
        self.save()
        env = dict(os.environ, PYTHONUNBUFFERED="1",  # this checkout's onestep in every subprocess
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        # the worker gets a few seconds past its own deadline to write up before it is killed
        try:
            out = run_process([sys.executable, str(TOOL), "--_worker", part, "--_spec", str(spec_file)], timeout + 3,
                              env=env, log_dir=self.work, name=f"part_{part}")
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
            rec["error"] = f"timed out after {timeout:.0f} s" + (f"; stderr tail:\n{tail(out['stderr'], 10)}"
                                                                  if out["stderr"].strip() else "")
        elif out["rc"] != 0:
            rec["status"] = "failed"
            rec["error"] = f"exit code {out['rc']}:\n{tail(out['stderr'])}"
        else:
            rec["status"] = result.get("status", "failed")
            if rec["status"] == "running":  # exited 0 without finishing: should not happen
                rec["status"] = "failed"
            if result.get("error"):
                rec["error"] = result["error"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Parts: " + ", ".join(PARTS) + ". Details: docs/gpu_check.md.")
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="hard time budget for all parts together (default 420: a rerun fits in a 10-minute command)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds on a CPU): same code paths")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    p.add_argument("--timeouts", default="", help="per-part timeouts in seconds, e.g. 'bench=120,bench_compile=300'")
    p.add_argument("--timeout-scale", type=float, default=1.0,
                   help="multiply every default timeout by this (e.g. 10 on a machine 10x slower than a GPU host)")
    p.add_argument("--nproc", type=int, default=None,
                   help="torchrun processes for the distributed part (default: the GPU count on cuda, 1 on cpu)")
    p.add_argument("--keep-runs", action="store_true", help="keep the distributed part's run directories")
    p.add_argument("--fail-part", action="append", default=[], help=argparse.SUPPRESS)  # PART[:hang] (testing)
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_dist-smoke", dest="dist_smoke", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker or args.dist_smoke:
        return args
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in args.parts if x not in PARTS]
    if bad or not args.parts:
        p.error(f"--parts: unknown {', '.join(bad) or '(none given)'}; allowed: {', '.join(PARTS)}")
    timeouts = {}
    for item in filter(None, (x.strip() for x in args.timeouts.split(","))):
        name, _, value = item.partition("=")
        try:
            timeouts[name] = float(value)
        except ValueError:
            p.error(f"--timeouts: '{item}' is not PART=SECONDS")
        if name not in PARTS or timeouts[name] <= 0:
            p.error(f"--timeouts: '{item}': PART must be one of {', '.join(PARTS)} and SECONDS > 0")
    args.timeouts = timeouts
    if args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    if args.timeout_scale <= 0:
        p.error("--timeout-scale must be > 0")
    if args.nproc is not None and args.nproc < 1:
        p.error("--nproc must be >= 1")
    args.fail = {}
    for item in args.fail_part:
        name, _, mode = item.partition(":")
        if name not in PARTS or mode not in ("", "error", "hang"):
            p.error(f"--fail-part: '{item}' is not PART[:error|:hang]")
        args.fail[name] = mode or "error"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        return worker_main(args._worker, args._spec)
    if args.dist_smoke:
        return dist_smoke(args.dist_smoke)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    return Runner(args).run()


if __name__ == "__main__":
    raise SystemExit(main())
