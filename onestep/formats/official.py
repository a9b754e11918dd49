"""The public ImageNet-256 checkpoints: ``dit`` (DiT), ``sit`` (SiT), ``repa_sit`` (REPA's SiT).

All three share one architecture and key layout (``arch`` module docstring); they differ in what
the time input and the output mean, which is what each format maps to onestep's velocity
v(z_t, t) (t = 1 noise, v = e − x, x = 0.18215 × SD-VAE latent in all three). Note that DiT and
SiT files have identical keys: only the format name tells their conventions apart.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones.dit import DiT
from ..registry import FORMATS, ConfigError
from .arch import OfficialArch, check_pos_embed, check_state, infer_arch
from .base import CheckpointFormat, check_backbone_state
from .convert import build_dit, fold_time_flip, negate_output, official_to_onestep
from .reading import read_checkpoint, rename_legacy_blocks
from .teachers import SiTTeacher, freeze
from .vp import VPEpsilonTeacher

__all__ = ["OfficialFormat", "DiTFormat", "SiTFormat", "RepaSiTFormat"]


class OfficialFormat(CheckpointFormat):
    """Shared reading, validation and conversion of the official layout."""

    out_factors: tuple[int, ...] = (1, 2)  # allowed output channels / input channels
    allow_projectors = False

    def prepare(self, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        return state

    def read(
        self, path: str, num_heads: int | None = None, default_heads: int | None = None
    ) -> tuple[dict[str, torch.Tensor], OfficialArch]:
        """The validated official state dict of ``path`` and its architecture (heads: ``infer_arch``)."""
        where = self.where(path)
        state = self.prepare(read_checkpoint(path, where), where)
        arch = infer_arch(state, where, num_heads=num_heads, default_heads=default_heads, out_factors=self.out_factors)
        check_state(state, arch, where, allow_projectors=self.allow_projectors)
        check_pos_embed(state, arch, where)
        return state, arch

    def velocity_state(self, state: dict[str, torch.Tensor], arch: OfficialArch) -> dict[str, torch.Tensor]:
        """onestep DiT weights whose net(z, t, 0, y) is v(z_t, t) (formats that are velocities)."""
        raise NotImplementedError

    def load_teacher(
        self, path: str, *, num_heads: int | None = None, dtype: torch.dtype | None = None, **options
    ) -> nn.Module:
        if options:
            raise ConfigError(f"{self.where(path)}: unknown teacher option(s) {', '.join(options)}")
        state, arch = self.read(path, num_heads)
        return freeze(build_dit(arch, self.velocity_state(state, arch), dtype))

    def init_state(self, path: str, backbone: nn.Module, *, num_heads: int | None = None) -> dict[str, torch.Tensor]:
        where = self.where(path)
        if not isinstance(backbone, DiT):
            raise ConfigError(
                f"{where}: initialisation needs an onestep DiT backbone (dit_*), got {type(backbone).__name__}"
            )
        own_heads = backbone.blocks[0].attn.num_heads
        state, arch = self.read(path, num_heads, default_heads=own_heads)
        if arch.num_heads != own_heads:
            raise ConfigError(f"{where}: the file's network has {arch.num_heads} heads, the backbone {own_heads}")
        if tuple(backbone.input_shape) != arch.input_shape:
            raise ConfigError(
                f"{where}: the file's input shape is {list(arch.input_shape)}, the backbone's "
                f"{list(backbone.input_shape)}"
            )
        if backbone.t_embedder.time_scale != 1.0:
            raise ConfigError(
                f"{where}: the backbone has time_scale {backbone.t_embedder.time_scale:g}; "
                f"the converted weights read the raw time (time_scale 1)"
            )
        return check_backbone_state(self.velocity_state(state, arch), backbone, where)


@FORMATS.register("dit")
class DiTFormat(OfficialFormat):
    """DiT (facebookresearch/DiT, e.g. DiT-XL-2-256x256.pt): ε-prediction on a DDPM VP schedule.

    Teacher: ``VPEpsilonTeacher`` (``formats/vp.py``): z_t / sqrt((1−t)² + t²) at the fractional
    DDPM index k(t) of the linear-β table, ε̂ = output channels 0..C-1 (the learned-Σ channels are
    dropped), v from ε̂; finite and continuous on all of [0, 1]. Guidance acts on all C channels
    (the released sampler guides channels 0–2 only). Not usable as an initialisation.
    """

    name = "dit"
    can_init = False

    def load_teacher(
        self, path: str, *, num_heads: int | None = None, dtype: torch.dtype | None = None, **options
    ) -> nn.Module:
        if options:
            raise ConfigError(f"{self.where(path)}: unknown teacher option(s) {', '.join(options)}")
        state, arch = self.read(path, num_heads)
        return VPEpsilonTeacher(freeze(build_dit(arch, official_to_onestep(state, arch), dtype)))

    def init_state(self, path: str, backbone: nn.Module, *, num_heads: int | None = None) -> dict[str, torch.Tensor]:
        raise ConfigError(self.init_refusal(path))

    def init_refusal(self, path: str) -> str:
        return (
            f"{self.where(path)}: a DiT checkpoint cannot initialise a velocity backbone (an ε-model on a "
            f"VP schedule is not a velocity network); use it as a teacher"
        )


@FORMATS.register("sit")
class SiTFormat(OfficialFormat):
    """SiT (willisma/SiT, e.g. SiT-XL-2-256x256.pt): linear interpolant, data at τ = 1, predicts data − noise.

    v(z_t, t) = −SiT(z_t, 1 − t)[:C]. The default teacher (and the initialisation) is a plain
    onestep DiT with the flip folded into t_embedder's first Linear (features of 1 − t are a fixed
    linear map of those of t) and the sign into the final linear; ``fold=False`` gives the written-out
    ``SiTTeacher`` instead. Learned-Σ channels (if any) are dropped. Guidance acts on all C
    channels (the released sampler guides channels 0–2 only).
    """

    name = "sit"

    def velocity_state(self, state, arch):
        return negate_output(fold_time_flip(official_to_onestep(state, arch)))

    def load_teacher(
        self, path: str, *, num_heads: int | None = None, dtype: torch.dtype | None = None, fold: bool = True, **options
    ) -> nn.Module:
        if fold:
            return super().load_teacher(path, num_heads=num_heads, dtype=dtype, **options)
        if options:
            raise ConfigError(f"{self.where(path)}: unknown teacher option(s) {', '.join(options)}")
        state, arch = self.read(path, num_heads)
        return SiTTeacher(build_dit(arch, official_to_onestep(state, arch), dtype))


@FORMATS.register("repa_sit")
class RepaSiTFormat(OfficialFormat):
    """REPA's SiT (sihyun-yu/REPA, e.g. last.pt): already onestep's convention, v(z_t, t) = SiT(z_t, t)[0].

    The conversion is the identity on the function; the projector MLPs (``projectors.*``) are
    ignored, legacy ``decoder_blocks.{i}`` names become ``blocks.{i + encoder_depth}`` (encoder_depth =
    the number of ``blocks.*`` indices in the file). No learned Σ. The released sampler guides all
    channels (within a t-interval); onestep's guidance is applied at every t.
    """

    name = "repa_sit"
    out_factors = (1,)
    allow_projectors = True

    def prepare(self, state, where):
        return rename_legacy_blocks(state, where)

    def velocity_state(self, state, arch):
        return official_to_onestep(state, arch)
