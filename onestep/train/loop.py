"""The one training loop: from scratch, from an init checkpoint, or resumed.

Per step: batch(step) -> ``TrainStep`` (loss, regularizers, backward, all-reduce, clip, optimizer,
EMA, EMA target) -> rows to the loggers. All randomness of a step comes from generators seeded by
(seed, step, rank), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from onestep.build import (
    backbone_kwargs,
    build_backbone,
    build_dataset,
    build_objective,
    build_regularizers,
    check_pairing,
    count_parameters,
)
from onestep.config import Config, to_plain
from onestep.data.base import BatchStream
from onestep.eval.evaluate import decodes_to_images, evaluate_model
from onestep.formats import init_weights, recipe_teacher
from onestep.loggers import open_loggers
from onestep.registry import ConfigError
from onestep.sampling import balanced_labels, guidance_cond, sample
from onestep.train.step import NonFiniteError, TrainStep, make_optimizer
from onestep.utils import distributed
from onestep.utils.device import allow_tf32, pick_device
from onestep.utils.environment import environment
from onestep.utils.rundir import RunDir, load_checkpoint
from onestep.utils.seeding import seeded_noise, step_seed
from onestep.utils.version import versions
from onestep.viz import save_samples_png


class TrainingError(RuntimeError):
    """The run stopped (e.g. a non-finite loss); the message says why and what was kept."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived: the step in flight finished, a checkpoint was saved, the run can resume."""

    def __init__(self, run: RunDir, step: int, signum: int):
        self.run_dir, self.step, self.signum = run.path, step, signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} at step {step}: checkpoint saved to {run.last_checkpoint}; "
            f"continue with `onestep train --resume {run.path}`"
        )


def resolved_config(cfg: Config, dataset, net, argv: list[str] | None) -> dict[str, Any]:
    """The recipe as run: every default filled in, the backbone's data-derived kwargs, and meta."""
    out = cfg.to_dict()
    out["backbone"] = {"name": cfg.backbone["name"], **to_plain(backbone_kwargs(cfg, dataset))}
    out["meta"] = {
        "versions": versions(),
        "argv": list(argv or sys.argv),
        "parameters": count_parameters(net),
        "threads": torch.get_num_threads(),
        "openmp": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in os.environ
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return out


def lr_at(step: int, base_lr: float, warmup: int, schedule: str = "constant", total: int = 1) -> float:
    """Linear warmup over ``warmup`` steps, then constant or cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return base_lr


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        resume: bool = False,
        argv: list[str] | None = None,
        console=None,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.rundir = RunDir(run_dir)
        self.run_dir = self.rundir.path
        self.argv = argv
        self.console = console
        self.dist = distributed.current()
        self.progress = progress and self.dist.is_main
        t = cfg.train
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        if t.tf32:
            allow_tf32()
        self.device = pick_device(t.device, self.dist.local_rank)
        torch.manual_seed(cfg.seed)
        self.dataset = build_dataset(cfg)
        self.net = build_backbone(cfg, self.dataset).to(self.device)
        self.objective = build_objective(cfg, self.dataset, recipe_teacher(cfg, self.dataset, self.device))
        check_pairing(cfg, self.objective, self.net)
        if t.precision == "fp16" and getattr(self.objective, "uses_jvp", False):
            raise ConfigError(
                f"train.precision=fp16 is refused for '{cfg.objective['name']}' (its JVP target "
                f"overflows in fp16); use bf16 or fp32"
            )
        if self.objective.trainable is not None:
            self.objective.trainable.to(self.device)
        self.regs = build_regularizers(cfg, self.net)
        self.step = 0
        resume_state = None
        if resume:
            resume_state = load_checkpoint(self.run_dir)
            self.step = int(resume_state["step"])
            if self.step >= t.steps:
                raise ConfigError(
                    f"--resume {self.run_dir}: the run is at step {self.step} and train.steps={t.steps}, "
                    f"so there is nothing to train; pass train.steps=N with N > {self.step}"
                )
        elif t.init_from:
            self._load_init(t.init_from)
        distributed.broadcast_parameters(self.net)
        # The module the objective calls: compiled when asked (checkpoints keep self.net's plain keys).
        train_net = self.net
        if t.compile:
            train_net = torch.compile(
                self.net, mode=None if t.compile_mode == "default" else t.compile_mode, backend=t.compile_backend
            )
        params = list(self.net.parameters())
        if self.objective.trainable is not None:
            params += list(self.objective.trainable.parameters())
        optimizer = make_optimizer(params, t.optimizer, t.lr, t.betas, t.weight_decay)
        self.train_step_fn = TrainStep(
            self.net,
            self.objective,
            self.regs,
            optimizer,
            ema_decay=t.ema_decay,
            ema_warmup=t.ema_warmup,
            precision=t.precision,
            grad_clip=t.grad_clip,
            train_net=train_net,
            device=self.device,
            world_size=self.dist.world_size,
        )
        if resume_state is not None:
            try:
                self.train_step_fn.load_state(resume_state, self.step)
            except RuntimeError as exc:
                raise ConfigError(f"--resume {self.run_dir}: {_first_mismatch(exc)}") from None
        self.ema = self.train_step_fn.ema
        try:
            self.stream = BatchStream(
                self.dataset,
                t.batch_size,
                seed=cfg.seed,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                allow_repeats=t.batch_with_repeats,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._stop_signal = 0
        self._preview_raw = False  # set when a latent run's VAE failed to load for previews
        self.preview_noise = seeded_noise(
            range(4096 if self.dataset.kind == "vector" else t.num_preview), tuple(self.dataset.shape), self.device
        )
        n_prev = self.preview_noise.shape[0]
        self.preview_labels = balanced_labels(range(n_prev), self.dataset.num_classes)
        if self.preview_labels is not None:
            self.preview_labels = self.preview_labels.to(self.device)
        self.loggers = None

    # -- state -------------------------------------------------------------------------------
    def _load_init(self, path: str) -> None:
        """``train.init_from``: any checkpoint spec (``onestep.formats.init_weights``)."""
        weights = init_weights(path, self.net)
        try:
            self.net.load_state_dict(weights)
        except RuntimeError as exc:
            raise ConfigError(
                f"train.init_from={path}: weights do not fit this backbone: {_first_mismatch(exc)}"
            ) from None

    def state(self) -> dict[str, Any]:
        return {"step": self.step, **self.train_step_fn.state(), "config": self._config_dict, "versions": versions()}

    # -- pieces ------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        torch.manual_seed(step_seed(self.cfg.seed, step, self.dist.rank))
        x, y = self.stream.batch(step)
        x = x.to(self.device, non_blocking=True)
        y = None if y is None else y.to(self.device, non_blocking=True)
        t = self.cfg.train
        lr = lr_at(step, t.lr, t.warmup_steps, t.lr_schedule, t.steps)
        try:
            row, stop = self.train_step_fn(x, y, step=step, lr=lr, stop=bool(self._stop_signal))
        except NonFiniteError as exc:
            raise TrainingError(self._diverged_message(step, exc.what, exc.value)) from None
        if stop and not self._stop_signal:
            self._stop_signal = signal.SIGTERM
        return row

    def _diverged_message(self, step: int, what: str, value: float) -> str:
        last = self.rundir.last_checkpoint
        kept = f"last good checkpoint kept: {last}" if last.exists() else "no checkpoint had been written yet"
        return (
            f"non-finite {what} ({value}) at step {step}; training stopped without saving this state, "
            f"{kept}. Lower train.lr, set train.grad_clip, or use precision fp32."
        )

    def preview(self) -> Path:
        """1-NFE samples of the EMA model from fixed noise as a PNG under samples/. Latent runs with
        ``data.vae`` show the decoded images; if that VAE cannot be loaded, one warning is printed
        and the previews fall back to the raw latents (the run goes on)."""
        self.ema.model.eval()
        # Guidance-conditioned models preview at the recipe's (first) eval.guidance, if any.
        omegas = self.cfg.eval.guidance if isinstance(self.cfg.eval.guidance, list) else [self.cfg.eval.guidance]
        cond = (
            guidance_cond(omegas[0], self.cfg.eval.guidance_interval if omegas[0] is not None else None)
            if omegas
            else None
        )
        x = sample(self.objective, self.ema.model, self.preview_noise, self.preview_labels, nfe=1, cond=cond)
        ncol = self.dataset.num_classes if 0 < self.dataset.num_classes <= 16 else None
        kind = self.dataset.kind
        if decodes_to_images(self.dataset) and not self._preview_raw:
            try:
                x, kind = self.dataset.decode(x), "image"
            except (ConfigError, ImportError, OSError) as exc:
                self._preview_raw = True
                print(f"warning: previews stay raw latents, the VAE did not load: {exc}", file=sys.stderr)
        path = save_samples_png(x, kind, self.rundir.preview_path(self.step), ncol=ncol)
        if self.loggers is not None:
            self.loggers.log_image("samples/nfe1", path, self.step)
        return path

    def save(self, numbered: bool) -> Path:
        t = self.cfg.train
        return self.rundir.save_checkpoint(
            self.state(), numbered=numbered, keep=t.keep_checkpoints, protected=t.keep_steps
        )

    def periodic_eval(self) -> None:
        ev = self.cfg.eval
        # Every rank generates its share of the samples; rank 0 writes the rows.
        rows = evaluate_model(
            self.objective,
            self.ema.model,
            self.dataset,
            nfes=ev.nfe,
            metrics=ev.metrics,
            num_samples=ev.num_samples,
            seed=ev.seed,
            batch_size=ev.batch_size,
            device=self.device,
            step=self.step,
            weights="ema",
            reference=ev.reference,
            feature_extractor=ev.feature_extractor,
            guidance=ev.guidance,
            guidance_interval=ev.guidance_interval,
        )
        if self.dist.is_main:
            self.rundir.append_metrics(rows)
            self.loggers.log_metrics(rows)

    # -- main --------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum

    def run_training(self) -> Path:
        main_proc = self.dist.is_main
        self._config_dict = resolved_config(self.cfg, self.dataset, self.net, self.argv)
        if main_proc:
            if self.step == 0 or not self.rundir.is_run():
                self.rundir.write_config(self._config_dict)
            self.rundir.truncate_stats(self.step)  # rows a killed run wrote past its last checkpoint
            # Where this stretch of training ran (a resumed run may have moved machine or torch).
            self.rundir.append_environment(
                {"step": self.step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **environment()}
            )
            self.loggers = open_loggers(self.cfg.train.loggers, self.rundir, self._config_dict, resumed=self.step > 0)
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._loop(main_proc)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if self.loggers is not None:
                self.loggers.close()
        distributed.barrier()
        return self.run_dir

    def run(self) -> Path:
        """Train to ``train.steps`` holding the run directory's writer lock (rank 0)."""
        if not self.dist.is_main:
            return self.run_training()
        with self.rundir.lock():
            return self.run_training()

    def _loop(self, main_proc: bool) -> None:
        t = self.cfg.train
        per_step = t.batch_size
        t0 = time.perf_counter()
        last_log_t, last_log_step = t0, self.step
        progress = _Progress(self.console, total=t.steps, start=self.step, enabled=self.progress)
        with progress:
            while self.step < t.steps:
                logs = self.train_step(self.step)
                self.step += 1
                progress.update(self.step, logs["loss"])
                if main_proc and (self.step % t.log_every == 0 or self.step == t.steps):
                    now = time.perf_counter()
                    rate = (self.step - last_log_step) / max(now - last_log_t, 1e-9)
                    last_log_t, last_log_step = now, self.step
                    self.loggers.log_row(
                        {
                            "step": self.step,
                            **{k: round(v, 6) for k, v in logs.items()},
                            "steps_per_s": round(rate, 3),
                            "images_per_s": round(rate * per_step, 1),
                            "time_s": round(now - t0, 2),
                        }
                    )
                every = t.checkpoint_every and self.step % t.checkpoint_every == 0
                numbered = bool(every or self.step in t.keep_steps) and self.step != t.steps
                if self._stop_signal:
                    # A step due a numbered checkpoint keeps it even when stopped there: the resumed
                    # run starts after it and would never write it (a learning curve's point).
                    if main_proc:
                        self.save(numbered=numbered)
                    distributed.barrier()
                    raise TrainingInterrupted(self.rundir, self.step, int(self._stop_signal))
                if main_proc and t.sample_every and self.step % t.sample_every == 0:
                    self.preview()
                if main_proc and numbered:
                    self.save(numbered=True)
                if self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and self.step != t.steps:
                    self.periodic_eval()  # on every rank
        if main_proc:
            self.save(numbered=True)
            self.preview()
        if self.cfg.eval.every:
            self.periodic_eval()  # on every rank


def _first_mismatch(exc: RuntimeError) -> str:
    """The first line of a load_state_dict error (the first mismatched key and both shapes)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next(
        (line for line in lines[1:] if "size mismatch" in line or "Missing" in line or "Unexpected" in line),
        lines[0] if lines else str(exc),
    )
    return detail[:300]


class _Progress:
    """A rich progress bar with loss and steps/s (silent when disabled)."""

    def __init__(self, console, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:.1f} step/s"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), rate=0.0)
        self.t0, self.s0 = time.perf_counter(), start

    def __enter__(self):
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)

    def update(self, step: int, loss: float) -> None:
        if self.enabled:
            rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, completed=step, loss=loss, rate=rate)


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    argv: list[str] | None = None,
    console=None,
    progress: bool = True,
) -> Path:
    return Trainer(cfg, run_dir, resume=resume, argv=argv, console=console, progress=progress).run()
