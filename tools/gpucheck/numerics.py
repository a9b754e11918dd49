"""Part 2, ``numerics``: MeanFlow's loss, gradients and du/dt per attention JVP kernel and precision
against a float64 CPU reference, and the other JVP objectives through ``objective.loss(...)`` with
CPU-drawn randomness (``cpu_random``); pass/fail against ``TOLERANCES``."""

from __future__ import annotations

import contextlib
import traceback

from .procs import tail
from .worker import Worker, _torch_device

# Numerics: pass when max|a - ref| / max|ref| (loss, du/dt) and ||a - ref|| / ||ref|| (all parameter
# gradients as one vector) are at most these, per autocast precision.
TOLERANCES = {"fp32": {"loss": 1e-4, "grad": 1e-3, "dudt": 1e-3}, "bf16": {"loss": 5e-2, "grad": 1e-1, "dudt": 1e-1}}
GENERIC_OBJECTIVES = ("meanflow", "improved_meanflow", "scm")  # compared through objective.loss(...)


def randomized_net(spec: dict, **extra):
    """The numerics DiT in float64 on the CPU with every parameter random (DiT zero-initialises its
    adaLN and output layers, which would leave most gradients zero). ``extra``: more backbone kwargs
    (``guidance_conditions=True`` for objectives that need guidance inputs)."""
    import torch

    from onestep.registry import BACKBONES

    torch.manual_seed(0)
    net = BACKBONES.build(
        spec["backbone"], input_shape=list(spec["shape"]), num_classes=spec["num_classes"], **spec["kwargs"], **extra
    )
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
    precision = (
        torch.autocast(device_type=x.device.type, enabled=False) if objective.target_fp32 else contextlib.nullcontext()
    )
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

    from onestep.utils.device import autocast_ctx

    net.zero_grad(set_to_none=True)
    # As the training step runs a JVP objective: bf16 autocast without the weight-cast cache.
    ctx = autocast_ctx(device, "bf16", cache=False) if autocast_bf16 else contextlib.nullcontext()
    with ctx:
        out = fn(net)
    loss = out.loss
    (loss if loss.dtype == torch.float64 else loss.float()).mean().backward()
    grads = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double().cpu()
            for p in net.parameters()
        ]
    )
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
    names = (
        "randn",
        "rand",
        "randint",
        "randperm",
        "randn_like",
        "rand_like",
        "randint_like",
        "multinomial",
        "bernoulli",
        "normal",
    )
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
            return finish(
                saved[fn](*size, generator=g, dtype=torch.float32), device, dtype or torch.get_default_dtype(), grad
            )

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

    patched = {
        "randn": floating("randn"),
        "rand": floating("rand"),
        "randint": randint,
        "randperm": randperm,
        "randn_like": like("randn"),
        "rand_like": like("rand"),
        "randint_like": randint_like,
        "multinomial": multinomial,
        "bernoulli": bernoulli,
        "normal": normal,
    }
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
        kernels = (
            ("fused", "explicit") if "jvp_kernel" in inspect.signature(OBJECTIVES.get(name)).parameters else (None,)
        )
        ref = evaluate_loss(call(kernels[-1], x.double(), y), ref_net, torch.device("cpu"), False)
    except Exception:  # noqa: BLE001 - recorded
        return [{"check": GENERIC_CHECK, "objective": name, "pass": False, "error": tail(traceback.format_exc(), 8)}]
    for precision in ("fp32", "bf16"):
        for kernel in kernels:
            row = {
                "check": GENERIC_CHECK,
                "objective": name,
                "precision": precision,
                "kernel": kernel or "default",
                "tolerance": TOLERANCES[precision],
            }
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
    from onestep.utils.device import allow_tf32

    device = _torch_device(w.device)
    if device.type == "cuda":  # fp32 must mean fp32 here
        allow_tf32(False)
    spec = w.sizes["numerics"]
    ref_net = randomized_net(spec)
    x, y, e, t, r = numerics_inputs(spec)
    moving = t != r
    # Guidance folded in (the B/2 and digits setting); adaptive_p=0: the loss is the plain sum of
    # squares l, not l / sg(l + c) (which sits near 1 and hides errors in l).
    mf = dict(cfg_omega=1.0, cfg_kappa=0.5, adaptive_p=0.0)
    w.result["setup"] = {
        "backbone": spec["backbone"],
        **spec["kwargs"],
        "input_shape": list(spec["shape"]),
        "batch": spec["batch"],
        "num_classes": spec["num_classes"],
        "meanflow": mf,
        "r_neq_t": int(moving.sum()),
        "device": str(device),
        "tf32": False,
        "tolerances": TOLERANCES,
    }
    rows = []
    w.result["rows"] = rows

    def on_device(dtype_net):
        return copy.deepcopy(ref_net).to(device=device, dtype=dtype_net)

    # Float64 CPU reference: the plain path (whole-batch JVP, explicit softmax).
    ref_obj = MeanFlow(jvp_kernel="explicit", jvp_only_r_neq_t=False, **mf)
    args64 = [a.double() if a.is_floating_point() else a for a in (x, y, e, t, r)]

    def mf_fn(obj, args):
        xx, yy, ee, tt, rr = args
        return (
            lambda net: obj.loss_given(net, xx, yy, e=ee, t=tt, r=rr),
            lambda net: meanflow_dudt(obj, net, xx, yy, ee, tt, rr),
        )

    loss_fn, dudt_fn = mf_fn(ref_obj, args64)
    ref = evaluate_loss(loss_fn, ref_net, torch.device("cpu"), False, dudt_fn)
    args_dev = [a.to(device) for a in (x, y, e, t, r)]
    cases = [("fp32", True), ("bf16", True), ("bf16", False)]
    for precision, target_fp32 in cases:
        per_kernel = {}
        for kernel in ("fused", "explicit", "sdpa_math"):
            row = {
                "check": "meanflow loss_given",
                "objective": "meanflow",
                "precision": precision,
                "target_fp32": target_fp32,
                "kernel": kernel,
                "tolerance": TOLERANCES[precision],
            }
            try:
                obj = MeanFlow(jvp_kernel=kernel, target_fp32=target_fp32, **mf)
                loss_fn, dudt_fn = mf_fn(obj, args_dev)
                got = evaluate_loss(loss_fn, on_device(torch.float32), device, precision == "bf16", dudt_fn)
                per_kernel[kernel] = got
                row["vs_float64"] = compare(got, ref, moving)
                if kernel != "explicit" and "explicit" in per_kernel:
                    row["vs_explicit"] = compare(got, per_kernel["explicit"], moving)
                row["pass"] = within(row["vs_float64"], TOLERANCES[precision]) and within(
                    row.get("vs_explicit", {}), TOLERANCES[precision]
                )
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
    failed = [
        f"{rw['objective']} {rw.get('precision', '')} {rw.get('kernel', '')}".strip()
        for rw in rows
        if rw.get("pass") is False
    ]
    w.result["checks"] = {"all_within_tolerance": not failed}
    if failed:
        w.result["error"] = "outside tolerance or raised: " + "; ".join(failed)
    w.result["status"] = "ok" if not failed else "failed"
