"""``wandb``: Weights & Biases (needs the ``wandb`` package: ``pip install "onestep[wandb]"``). The
run lives in RUN/wandb; ``WANDB_MODE=offline`` (or ``mode: offline``) needs no network or account.
Training rows are logged at their step, evaluation rows as ``eval/<metric>@<nfe>``, the resolved
config as the run config."""

from __future__ import annotations

from typing import Literal

from onestep.loggers.base import Logger
from onestep.registry import LOGGERS, ConfigError


class WandbLogger(Logger):
    name = "wandb"

    def __init__(
        self,
        project: str = "onestep",
        entity: str | None = None,
        mode: str | None = None,
        tags: list[str] | None = None,
    ):
        self.project, self.entity, self.mode, self.tags = project, entity, mode, tags
        self.run = None

    def open(self, run, config, resumed):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "train.loggers: 'wandb' needs the wandb package; pip install \"onestep[wandb]\" "
                "(or remove it from train.loggers)"
            ) from None
        (run.path / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            tags=self.tags,
            dir=str(run.path),
            name=run.name,
            config=config,
            resume="allow" if resumed else None,
            id=None,
        )

    def log_row(self, row):
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def log_metrics(self, rows):
        for r in rows:
            self.run.log({f"eval/{r['metric']}@{r['nfe']}": float(r["value"])}, step=int(r["step"]))

    def log_image(self, tag, path, step):
        import wandb

        self.run.log({tag: wandb.Image(str(path))}, step=step)

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None
            import wandb

            # finish() hands the last records to wandb's service process, which writes them later;
            # shutting the service down (when no other run of this process uses it) makes the run's
            # files complete when train returns.
            if wandb.run is None:
                wandb.teardown()


@LOGGERS.register("wandb")
def wandb(
    project: str = "onestep",
    entity: str | None = None,
    mode: Literal["online", "offline", "disabled"] | None = None,
    tags: list[str] | None = None,
) -> WandbLogger:
    """Weights & Biases (the wandb extra); mode offline needs no network (or set WANDB_MODE=offline)."""
    if not project:
        raise ConfigError("logger 'wandb': project must be a non-empty string")
    return WandbLogger(project, entity, mode, tags)
