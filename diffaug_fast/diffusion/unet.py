"""Our ADM UNet (Dhariwal & Nichol; Nichol & Dhariwal), written so OpenAI's released checkpoints load
with ``strict=True``: every parameter name and shape equals guided-diffusion's / improved-diffusion's.

The module tree mirrors the official one only where it shows up in the state_dict (``in_layers.2``,
``emb_layers.1``, ``out_layers.3``, ``qkv``, ``proj_out``, ``op``, ``conv``...). The computation is ours:
attention runs through ``scaled_dot_product_attention`` for both channel layouts, GroupNorm computes in
float32 whatever the block dtype (as ``GroupNorm32`` does).

Shapes: input x [B, in_channels, H, W] with H and W divisible by ``config.total_downsampling``; timesteps
[B] (integer t, or float t*1000/T for improved-diffusion models, see ``schedule.Schedule``); output
[B, out_channels, H, W] in float32 (the first 3 channels are eps, the rest the learned variance).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.norm import group_norm_silu_eager_or_op
from ..ops.winograd import WinogradConv2d, winograd_supported
from .schedule import Schedule, make_schedule

__all__ = ["UNetConfig", "UNet", "PRESETS", "get_preset", "timestep_embedding", "CONV_ALGOS"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture + the diffusion settings the checkpoint was trained with.

    ``attention_ds`` lists downsampling rates (1, 2, 4, ...) whose blocks carry attention; OpenAI's
    ``attention_resolutions="32,16,8"`` at image_size 256 is attention_ds (8, 16, 32).
    """

    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[float, ...]
    attention_ds: tuple[int, ...]
    in_channels: int = 3
    out_channels: int = 6
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    conv_resample: bool = True
    use_new_attention_order: bool = False
    num_classes: int | None = None
    dropout: float = 0.0
    # diffusion settings (not visible in the weights)
    image_size: int = 256
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    rescale_timesteps: bool = False
    family: str = "guided-diffusion"

    @property
    def total_downsampling(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    def heads(self, channels: int, upsample: bool = False) -> int:
        if self.num_head_channels != -1:
            if channels % self.num_head_channels:
                raise ValueError(f"{channels} channels not divisible by num_head_channels={self.num_head_channels}")
            return channels // self.num_head_channels
        if upsample and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return self.num_heads

    def schedule(self) -> Schedule:
        return make_schedule(self.noise_schedule, self.diffusion_steps, self.rescale_timesteps)

    def to_dict(self) -> dict:
        return asdict(self)


def _guided(**kw) -> UNetConfig:
    base = dict(use_scale_shift_norm=True, resblock_updown=True, family="guided-diffusion")
    base.update(kw)
    return UNetConfig(**base)


def _improved(**kw) -> UNetConfig:
    base = dict(
        use_scale_shift_norm=True,
        resblock_updown=False,
        conv_resample=True,
        noise_schedule="cosine",
        diffusion_steps=4000,
        rescale_timesteps=True,
        num_heads=4,
        family="improved-diffusion",
    )
    base.update(kw)
    return UNetConfig(**base)


PRESETS: dict[str, UNetConfig] = {
    # guided-diffusion 256x256_diffusion_uncond.pt (552,814,086 parameters)
    "adm256-uncond": _guided(
        image_size=256, model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
        attention_ds=(8, 16, 32), num_head_channels=64,
    ),
    # improved-diffusion imagenet64_uncond_100M_1500K.pt
    "iddpm-imagenet64-uncond": _improved(
        image_size=64, model_channels=128, num_res_blocks=3, channel_mult=(1, 2, 3, 4), attention_ds=(4, 8),
    ),
    # improved-diffusion cifar10_uncond_50M_500K.pt
    "iddpm-cifar10-uncond": _improved(
        image_size=32, model_channels=128, num_res_blocks=3, channel_mult=(1, 2, 2, 2), attention_ds=(2, 4),
    ),
    # Mid-size guided-style model with adm256's depth (total downsampling 32, so 224x224 works): benches.
    "adm-small": _guided(
        image_size=256, model_channels=64, num_res_blocks=1, channel_mult=(1, 1, 2, 2, 4, 4),
        attention_ds=(8, 16, 32), num_head_channels=64,
    ),
    # Tiny presets for fast tests and the demo: every code path of their family, few FLOPs.
    "adm-tiny": _guided(
        image_size=32, model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2), attention_ds=(2, 4),
        num_head_channels=16,
    ),
    "iddpm-tiny": _improved(
        image_size=32, model_channels=32, num_res_blocks=2, channel_mult=(1, 2), attention_ds=(2,), num_heads=2,
    ),
}


def get_preset(name: str, **overrides) -> UNetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


# ----------------------------------------------------------------------------------------------------
# building blocks


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps -> [B, dim] float32 sinusoids, cos first (the OpenAI convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) whose statistics and affine run in float32 whatever the activation dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), 32, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def norm_silu(norm: GroupNorm32, x: torch.Tensor, scale: torch.Tensor | None = None,
              shift: torch.Tensor | None = None) -> torch.Tensor:
    """silu(norm(x) * (1 + scale) + shift) through the fused op (one pass on CPU float32)."""
    return group_norm_silu_eager_or_op(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps)


CONV_ALGOS = ("direct", "winograd")


def _nearest_up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _avg_down(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Nearest x2, then (improved-diffusion / conv_resample) a 3x3 conv named ``conv``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _nearest_up(x)
        return self.conv(x) if hasattr(self, "conv") else x


class Downsample(nn.Module):
    """A stride-2 3x3 conv named ``op`` (conv_resample) or a 2x2 average pool."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError("average-pool downsampling cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x) if hasattr(self, "op") else _avg_down(x)


class ResBlock(nn.Module):
    """GN-SiLU-conv, timestep scale/shift (or add), GN-SiLU-dropout-conv, plus skip; optional resampling."""

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int, dropout: float,
        use_scale_shift_norm: bool, up: bool = False, down: bool = False,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = _nearest_up if up else _avg_down if down else None
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    fused_norm = False  # set by UNet.set_fused_norm: GN(+scale/shift)+SiLU through ops.norm for float32

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, act, conv = self.in_layers
        fused = self.fused_norm and x.dtype == torch.float32
        h = norm_silu(norm, x) if fused else act(norm(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = conv(h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        out_norm, out_act, out_drop, out_conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            if fused:
                h = norm_silu(out_norm, h, scale.flatten(1), shift.flatten(1))
            else:
                h = out_act(out_norm(h) * (1 + scale) + shift)
        else:
            h = out_act(out_norm(h + emb_out))
        h = out_conv(out_drop(h))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over H*W positions. ``legacy`` = guided-diffusion's QKVAttentionLegacy layout: the
    3C qkv channels are grouped per head as [q_h, k_h, v_h]; the new order is [q (all heads), k, v].

    Both layouts are computed with scaled_dot_product_attention: the legacy ``(q * d^-1/4) . (k * d^-1/4)``
    is q.k / sqrt(d) up to float rounding, and SDPA keeps the softmax in float32 for low-precision inputs.
    """

    def __init__(self, channels: int, num_heads: int, new_order: bool):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels not divisible into {num_heads} heads")
        self.num_heads = num_heads
        self.new_order = new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        t = hh * ww
        x_flat = x.reshape(b, c, t)
        qkv = self.qkv(self.norm(x_flat))
        d = c // self.num_heads
        if self.new_order:
            q, k, v = qkv.view(b, 3, self.num_heads, d, t).unbind(1)
        else:
            q, k, v = qkv.view(b, self.num_heads, 3, d, t).unbind(2)
        # [B, heads, d, T] -> [B, heads, T, d]
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        a = a.transpose(-1, -2).reshape(b, c, t)
        return (x_flat + self.proj_out(a)).reshape(b, c, hh, ww)


class EmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


# ----------------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """The ADM UNet. ``forward(x [B,C,H,W], timesteps [B], y=None) -> [B, out_channels, H, W]`` float32.

    ``compute_dtype`` (set by ``set_compute_dtype``) is the dtype of the convolutions inside the
    input/middle/output blocks, guided-diffusion's ``convert_to_fp16`` generalised: the timestep MLP,
    GroupNorm affine and the final ``out`` layers stay float32.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        mc = cfg.model_channels
        emb_dim = 4 * mc
        self.compute_dtype = torch.float32
        self.eps_only = False  # set by Denoiser(eps_only=True): `out` computes only the eps channels
        self.conv_algo = "direct"
        self.fused_norm = False  # set_fused_norm
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        def res(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, cfg.dropout, cfg.use_scale_shift_norm, **kw)

        def attn(ch: int, upsample: bool = False) -> AttentionBlock:
            return AttentionBlock(ch, cfg.heads(ch, upsample), cfg.use_new_attention_order)

        ch = input_ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, cfg.conv_resample)
                self.input_blocks.append(EmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch, upsample=True))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, cfg.conv_resample))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(input_ch, cfg.out_channels, 3, padding=1))
        self._zero_init()

    def _zero_init(self) -> None:
        """OpenAI initialises the last conv of every residual branch, proj_out and ``out`` to zero."""
        zero = [self.out[2]]
        for m in self.modules():
            if isinstance(m, ResBlock):
                zero.append(m.out_layers[3])
            elif isinstance(m, AttentionBlock):
                zero.append(m.proj_out)
        for m in zero:
            if m.weight.device.type != "meta":
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def block_modules(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def set_compute_dtype(self, dtype: torch.dtype) -> UNet:
        """Cast the conv weights of the blocks to ``dtype`` (guided-diffusion's convert_to_fp16)."""
        for blocks in self.block_modules():
            for m in blocks.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.to(dtype)
        self.compute_dtype = dtype
        return self

    def set_fused_norm(self, enabled: bool) -> UNet:
        """Run GroupNorm (+ timestep scale/shift) + SiLU as one op (``ops/norm.py``) in the residual blocks
        and the output layer. On CPU float32 that is the extension's single-pass kernel (results differ from
        the unfused chain by float32 rounding); elsewhere the op runs the unfused chain."""
        self.fused_norm = bool(enabled)
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.fused_norm = self.fused_norm
        return self

    def set_conv_algo(self, algo: str, min_hw: int = 56 * 56) -> UNet:
        """Choose how the stride-1 3x3 float32 convolutions run on CPU.

        "direct": oneDNN/ATen direct convolution (float32 rounding, the default).
        "winograd": NNPACK's Winograd F(6x6, 3x3) for maps with H*W >= ``min_hw`` (where it wins, see
        bench/NOTES.md); ~5x the float32 rounding error of direct convolution, far inside the bf16/fp16
        reference's error. The state_dict is unchanged (the class of each conv is swapped in place).
        """
        if algo not in CONV_ALGOS:
            raise ValueError(f"conv_algo must be one of {CONV_ALGOS}, got {algo!r}")
        if algo == "winograd" and not winograd_supported():
            raise RuntimeError("conv_algo='winograd' needs PyTorch built with NNPACK (torch._nnpack_available())")
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1):
                m.__class__ = WinogradConv2d if algo == "winograd" else nn.Conv2d
                if algo == "winograd":
                    m.min_hw = min_hw
        self.conv_algo = algo
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels))
        if cfg.num_classes is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional: pass class labels y [B]")
            emb = emb + self.label_emb(y)
        h = x.to(self.compute_dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        if not self.eps_only:
            if self.fused_norm:
                return self.out[2](norm_silu(self.out[0], h.float()))
            return self.out(h.float())
        # Only the eps rows of the final conv: DiffAug never reads the variance channels.
        norm, act, conv = self.out
        c = cfg.in_channels
        h = norm_silu(norm, h.float()) if self.fused_norm else act(norm(h.float()))
        return conv._conv_forward(h, conv.weight[:c], conv.bias[:c])


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
