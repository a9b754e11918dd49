"""The one training loop: from scratch, from an init checkpoint, or resumed.

Per step: batch(step) -> objective.loss -> total = mean(loss) + sum_k weight_k * reg_k(features)
-> backward -> clip -> optimizer -> EMA. All randomness of a step comes from generators seeded by
(seed, step, rank), so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import json
import math
import platform
import signal
import sys
import threading
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from onestep import __version__
from onestep.build import (backbone_kwargs, build_backbone, build_dataset, build_objective,
                           build_regularizers, count_parameters)
from onestep.config import Config, dump_yaml, to_plain
from onestep.data.base import BatchStream
from onestep.eval.evaluate import decodes_to_images
from onestep.registry import ConfigError
from onestep.sampling import balanced_labels, sample, seeded_noise
from onestep.train import distributed
from onestep.train.checkpoint import load_checkpoint, save_checkpoint
from onestep.train.ema import EMA
from onestep.viz import save_samples_png


class TrainingError(RuntimeError):
    """The run stopped (e.g. a non-finite loss); the message says why and what was kept."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived: the step in flight finished, a checkpoint was saved, the run can resume."""

    def __init__(self, run_dir: Path, step: int, signum: int):
        self.run_dir, self.step, self.signum = run_dir, step, signum
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: checkpoint saved to {run_dir / 'checkpoints' / 'last.pt'}; "
                         f"continue with `onestep train --resume {run_dir}`")


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step) * 65_537 + rank + 17


def versions() -> dict[str, str]:
    return {"onestep": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def resolved_config(cfg: Config, dataset, net, argv: list[str] | None) -> dict[str, Any]:
    out = cfg.to_dict()
    out["backbone"] = {"name": cfg.backbone["name"], **to_plain(backbone_kwargs(cfg, dataset))}
    out["meta"] = {
        "versions": versions(),
        "argv": list(argv or sys.argv),
        "parameters": count_parameters(net),
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


def autocast_ctx(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, *, resume: bool = False, argv: list[str] | None = None,
                 console=None, progress: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.console = console
        self.dist = distributed.current()
        self.progress = progress and self.dist.is_main
        t = cfg.train
        self.device = pick_device(t.device, self.dist.local_rank)
        torch.manual_seed(cfg.seed)
        self.dataset = build_dataset(cfg)
        self.net = build_backbone(cfg, self.dataset).to(self.device)
        self.objective = build_objective(cfg, self.dataset, self.device)
        if t.precision == "fp16" and getattr(self.objective, "uses_jvp", False):
            raise ConfigError(f"train.precision=fp16 is refused for '{cfg.objective['name']}' (its JVP target "
                              f"overflows in fp16); use bf16 or fp32")
        self.regs = build_regularizers(cfg, self.net)
        self.feature_blocks = tuple(sorted({b for r in self.regs for b in r.blocks}))
        if t.optimizer == "sgd":
            self.opt = torch.optim.SGD(self.net.parameters(), lr=t.lr, momentum=t.betas[0], weight_decay=t.weight_decay)
        else:
            opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
            self.opt = opt_cls(self.net.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.step = 0
        if resume:
            self._load_resume()
        elif t.init_from:
            self._load_init(t.init_from)
        distributed.broadcast_parameters(self.net)
        self.ema = EMA(self.net, t.ema_decay, t.ema_warmup)
        # The module the objective calls: compiled when asked (checkpoints keep self.net's plain keys).
        self.train_net = self.net
        if t.compile:
            self.train_net = torch.compile(self.net, mode=None if t.compile_mode == "default" else t.compile_mode,
                                           backend=t.compile_backend)
        if resume:
            self.ema.load_state_dict(self._resume_state["ema"])
            del self._resume_state
        try:
            self.stream = BatchStream(self.dataset, t.batch_size, seed=cfg.seed, rank=self.dist.rank,
                                      world_size=self.dist.world_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._stop_signal = 0
        self._preview_raw = False  # set when a latent run's VAE failed to load for previews
        self.preview_noise = seeded_noise(range(4096 if self.dataset.kind == "vector" else t.num_preview),
                                          tuple(self.dataset.shape), self.device)
        n_prev = self.preview_noise.shape[0]
        self.preview_labels = balanced_labels(range(n_prev), self.dataset.num_classes)
        if self.preview_labels is not None:
            self.preview_labels = self.preview_labels.to(self.device)

    # -- state -------------------------------------------------------------------------------
    def _load_resume(self) -> None:
        state = load_checkpoint(self.run_dir)
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if "objective" in state and hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state["objective"])  # e.g. a consistency EMA target
        self._resume_state = state

    def _load_init(self, path: str) -> None:
        state = load_checkpoint(path)
        weights = state["ema"] if state.get("ema") is not None else state["model"]
        try:
            self.net.load_state_dict(weights)
        except RuntimeError as exc:
            raise ConfigError(f"train.init_from={path}: weights do not fit this backbone: "
                              f"{str(exc).splitlines()[0][:200]}") from None

    def state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "config": self._config_dict,
            "versions": versions(),
        }
        if callable(getattr(self.objective, "state_dict", None)):
            state["objective"] = self.objective.state_dict()
        return state

    # -- pieces ------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        t = self.cfg.train
        torch.manual_seed(step_seed(self.cfg.seed, step, self.dist.rank))
        x, y = self.stream.batch(step)
        x = x.to(self.device, non_blocking=True)
        y = None if y is None else y.to(self.device, non_blocking=True)
        lr = lr_at(step, t.lr, t.warmup_steps, t.lr_schedule, t.steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.net.train()
        # Objective loss (per sample) and the regularizers on its gradient-carrying features.
        with autocast_ctx(self.device, t.precision):
            out = self.objective.loss(self.train_net, x, y, step=step, feature_blocks=self.feature_blocks)
        main = out.loss.float().mean()
        total = main
        terms = {"loss_main": main.detach()}
        feats = dict(zip(self.feature_blocks, out.features))
        for reg in self.regs:
            value = torch.stack([reg.fn(feats[b].float()) for b in reg.blocks]).mean()
            total = total + reg.weight * value
            terms[f"loss_{reg.label}"] = value.detach()
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        # Average gradients over ranks; the loss and the stop flag ride along in the same all-reduce.
        extras = torch.stack([total.detach().float(), torch.tensor(float(self._stop_signal), device=total.device)])
        extras = distributed.sync_gradients(list(self.net.parameters()), extras, self.dist.world_size)
        loss_value, stop = extras.tolist()
        if stop > 0 and not self._stop_signal:
            self._stop_signal = signal.SIGTERM
        if not math.isfinite(loss_value):
            raise TrainingError(self._diverged_message(step, "loss", loss_value))
        clip = t.grad_clip if t.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip).item()
        if not math.isfinite(grad_norm):
            raise TrainingError(self._diverged_message(step, "gradient norm", grad_norm))
        self.opt.step()
        self.ema.update(self.net, step)
        # The objective's own logs first; the loop's keys (total loss, grad norm, lr) win on a clash.
        logs = {**{k: float(v) for k, v in out.logs.items()}, **{k: v.item() for k, v in terms.items()}}
        logs.update({"loss": loss_value, "grad_norm": grad_norm, "lr": lr})
        return logs

    def _diverged_message(self, step: int, what: str, value: float) -> str:
        last = self.run_dir / "checkpoints" / "last.pt"
        kept = f"last good checkpoint kept: {last}" if last.exists() else "no checkpoint had been written yet"
        return (f"non-finite {what} ({value}) at step {step}; training stopped without saving this state, "
                f"{kept}. Lower train.lr, set train.grad_clip, or use precision fp32.")

    def preview(self) -> Path:
        """1-NFE samples of the EMA model from fixed noise as a PNG under samples/. Latent runs with
        ``data.vae`` show the decoded images; if that VAE cannot be loaded, one warning is printed
        and the previews fall back to the raw latents (the run goes on)."""
        self.ema.model.eval()
        x = sample(self.objective, self.ema.model, self.preview_noise, self.preview_labels, nfe=1)
        ncol = self.dataset.num_classes if 0 < self.dataset.num_classes <= 16 else None
        kind = self.dataset.kind
        if decodes_to_images(self.dataset) and not self._preview_raw:
            try:
                x, kind = self.dataset.decode(x), "image"
            except (ConfigError, ImportError, OSError) as exc:
                self._preview_raw = True
                print(f"warning: previews stay raw latents, the VAE did not load: {exc}", file=sys.stderr)
        return save_samples_png(x, kind, self.run_dir / "samples" / f"step_{self.step:09d}_nfe1.png", ncol=ncol)

    def save(self, numbered: bool) -> Path:
        return save_checkpoint(self.run_dir, self.state(), numbered=numbered, keep=self.cfg.train.keep_checkpoints)

    def periodic_eval(self) -> None:
        from onestep.eval.evaluate import evaluate_model, write_rows

        ev = self.cfg.eval
        # Every rank generates its share of the samples; rank 0 writes the rows.
        rows = evaluate_model(self.objective, self.ema.model, self.dataset, nfes=ev.nfe, metrics=ev.metrics,
                              num_samples=ev.num_samples, seed=ev.seed, batch_size=ev.batch_size,
                              device=self.device, step=self.step, weights="ema", reference=ev.reference,
                              feature_extractor=ev.feature_extractor)
        if self.dist.is_main:
            write_rows(self.run_dir, rows)

    # -- main --------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum

    def run(self) -> Path:
        main_proc = self.dist.is_main
        self._config_dict = resolved_config(self.cfg, self.dataset, self.net, self._argv)
        if main_proc:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.step == 0 or not (self.run_dir / "config.yaml").exists():
                (self.run_dir / "config.yaml").write_text(dump_yaml(self._config_dict))
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._loop(main_proc)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        distributed.barrier()
        return self.run_dir

    def _loop(self, main_proc: bool) -> None:
        t = self.cfg.train
        per_step = t.batch_size
        t0 = time.perf_counter()
        last_log_t, last_log_step = t0, self.step
        progress = _Progress(self.console, total=t.steps, start=self.step, enabled=self.progress)
        stats = open(self.run_dir / "stats.jsonl", "a") if main_proc else None
        try:
            with progress:
                while self.step < t.steps:
                    logs = self.train_step(self.step)
                    self.step += 1
                    progress.update(self.step, logs["loss"])
                    if main_proc and (self.step % t.log_every == 0 or self.step == t.steps):
                        now = time.perf_counter()
                        rate = (self.step - last_log_step) / max(now - last_log_t, 1e-9)
                        last_log_t, last_log_step = now, self.step
                        row = {"step": self.step, **{k: round(v, 6) for k, v in logs.items()},
                               "steps_per_s": round(rate, 3), "images_per_s": round(rate * per_step, 1),
                               "time_s": round(now - t0, 2)}
                        stats.write(json.dumps(row) + "\n")
                        stats.flush()
                    if self._stop_signal:
                        if main_proc:
                            self.save(numbered=False)
                        distributed.barrier()
                        raise TrainingInterrupted(self.run_dir, self.step, int(self._stop_signal))
                    if main_proc and t.sample_every and self.step % t.sample_every == 0:
                        self.preview()
                    if main_proc and t.checkpoint_every and self.step % t.checkpoint_every == 0 \
                            and self.step != t.steps:
                        self.save(numbered=True)
                    if self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and self.step != t.steps:
                        self.periodic_eval()  # on every rank
        finally:
            if stats is not None:
                stats.close()
        if main_proc:
            self.save(numbered=True)
            self.preview()
        if self.cfg.eval.every:
            self.periodic_eval()  # on every rank

    _argv: list[str] | None = None


class _Progress:
    """A rich progress bar with loss and steps/s (silent when disabled)."""

    def __init__(self, console, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.1f} step/s"),
                            TimeRemainingColumn(), console=console, transient=False)
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


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, argv: list[str] | None = None,
          console=None, progress: bool = True) -> Path:
    trainer = Trainer(cfg, run_dir, resume=resume, argv=argv, console=console, progress=progress)
    trainer._argv = argv
    return trainer.run()
