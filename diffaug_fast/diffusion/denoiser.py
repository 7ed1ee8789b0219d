"""The Denoiser: a frozen ADM UNet with its schedule and how it runs (fast or reference numerics, dtype,
channels_last, fused GroupNorm, Winograd, torch.compile), and ``load_denoiser`` (checkpoint reading in
checkpoint.py beside this file).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from .checkpoint import (
    SIDECAR_FORMAT,
    CheckpointError,
    StateDict,
    _as_state_dict,
    check_finite_weights,
    check_state_dict,
    infer_config,
    read_sidecar,
    read_state_dict,
    sidecar_path,
)
from .schedule import Schedule
from .unet import UNet, UNetConfig, get_preset

__all__ = ["Denoiser", "load_denoiser", "CheckpointError", "infer_config", "read_state_dict", "read_sidecar",
           "sidecar_path", "SIDECAR_FORMAT"]


# ----------------------------------------------------------------------------------------------------


_LOW_PRECISION = (torch.float16, torch.bfloat16)
MODES = ("fast", "reference")


class Denoiser(nn.Module):
    """A frozen ADM UNet with its schedule and timestep convention, and how it is executed.

    ``forward(x_t [B, 3, H, W] float, t [B] int64) -> [B, out_channels, H, W]`` float32, the raw UNet
    output (eps in the first 3 channels; only those 3 with ``eps_only=True``). The UNet is in eval mode
    with requires_grad=False.

    Execution knobs (all default to the plain eager float32 model):
      dtype: None (keep the UNet's compute dtype), float32, float16 or bfloat16.
      mode: "fast" = block convolutions and attention in ``dtype``, GroupNorm statistics, the attention
        softmax (SDPA), the timestep MLP and the output layer in float32. "reference" = the numerics of
        guided-diffusion's ``convert_to_fp16`` run under autocast (fp16, or the bf16 analogue), which is how
        the DiffAug reference code runs the UNet: reproduces the paper's setting.
      channels_last: activations and conv weights in NHWC (what oneDNN and cuDNN prefer); None = on GPU.
      eps_only: compute only the eps rows of the final conv (the variance channels are never read by
        DiffAug); the output then has 3 channels.
      conv_algo: "direct" or "winograd" (CPU float32 only, see ``ops/winograd.py``).
      fused_norm: GroupNorm + timestep scale/shift + SiLU as one op (``ops/norm.py``): a single pass
        on CPU float32 instead of five (differs from the unfused chain by float32 rounding).
      compile: torch.compile the UNet (CPU: Inductor C++ with weight freezing; GPU: max-autotune with CUDA
        graphs). Shapes are bucketed so a run compiles once per image size: batches are zero-padded up to
        the smallest compiled batch size that fits (or split into chunks of the largest). ``warmup`` compiles
        ahead of time and returns the seconds spent; unplanned compiles are recorded in ``compile_log`` too.
    The compiled path runs under ``torch.no_grad`` (not inference_mode: augment's output feeds an
    autograd graph downstream).
    """

    def __init__(
        self,
        unet: UNet,
        schedule: Schedule | None = None,
        name: str = "custom",
        *,
        dtype: torch.dtype | None = None,
        mode: str = "fast",
        channels_last: bool | None = False,
        eps_only: bool = False,
        conv_algo: str = "direct",
        fused_norm: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if dtype is not None and dtype not in (torch.float32, *_LOW_PRECISION):
            raise TypeError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        self.unet = unet.eval().requires_grad_(False)
        self.config = unet.config
        self.schedule = schedule or unet.config.schedule()
        self.name = name
        self.source = "state_dict"
        if dtype is not None and dtype != unet.compute_dtype:
            unet.set_compute_dtype(dtype)
        self.mode = mode
        dev = self.device
        self.channels_last = dev.type == "cuda" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.unet.eps_only = bool(eps_only)
        self.unet.set_conv_algo(conv_algo)
        self.unet.set_fused_norm(fused_norm)
        self.compiled = bool(compile)
        self.compile_log: list[tuple[tuple[int, int, int], float]] = []  # ((B, H, W), seconds) per compile
        self._buckets: dict[tuple[int, int], list[int]] = {}  # (H, W) -> compiled batch sizes
        self._compiled_fn = None
        if compile:
            self._compiled_fn = _compile(self._run_eager, dev)
        self.eval()

    def train(self, mode: bool = True) -> Denoiser:
        """Always stays in eval mode (dropout off), even inside a parent module switched to train()."""
        return super().train(False)

    @property
    def total_downsampling(self) -> int:
        return self.config.total_downsampling

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.compute_dtype

    @property
    def eps_only(self) -> bool:
        return self.unet.eps_only

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    def _run_eager(self, x_t: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        if self.mode == "reference" and self.dtype in _LOW_PRECISION:
            with torch.autocast(x_t.device.type, dtype=self.dtype):
                return self.unet(x_t, ts).float()
        return self.unet(x_t, ts)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ts = self.schedule.model_timesteps(t)
        if self._compiled_fn is None:
            return self._run_eager(x_t, ts)
        with torch.no_grad():
            return self._run_compiled(x_t, ts)

    # ------------------------------------------------------------------------------------------------
    # compiled execution with shape buckets

    def _bucket(self, b: int, h: int, w: int) -> int:
        sizes = self._buckets.setdefault((h, w), [])
        fits = [s for s in sizes if s >= b]
        if fits:
            return min(fits)
        if sizes:  # larger than every compiled batch: run in chunks of the largest, no new compile
            return max(sizes)
        sizes.append(b)
        return b

    def _call_bucket(self, x_t: torch.Tensor, ts: torch.Tensor, bucket: int) -> torch.Tensor:
        b = x_t.shape[0]
        if b < bucket:  # zero-pad the batch: same compiled graph, padded rows are dropped
            x_t = torch.cat([x_t, x_t.new_zeros((bucket - b, *x_t.shape[1:]))])
            ts = torch.cat([ts, ts.new_zeros(bucket - b)])
        key = (bucket, *x_t.shape[-2:])
        first = key not in {k for k, _ in self.compile_log}
        start = time.perf_counter()
        if x_t.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        out = self._compiled_fn(x_t.float(), ts)
        if first:
            self.compile_log.append((key, time.perf_counter() - start))
        # CUDA graphs reuse their output buffer on the next replay: hand out a copy.
        return out[:b].clone() if (b < bucket or out.device.type == "cuda") else out

    def _run_compiled(self, x_t: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x_t.shape
        bucket = self._bucket(b, h, w)
        if b <= bucket:
            return self._call_bucket(x_t, ts, bucket)
        return torch.cat([self._call_bucket(x_t[i : i + bucket], ts[i : i + bucket], bucket)
                          for i in range(0, b, bucket)])

    def warmup(self, batch: int, height: int, width: int, iters: int = 2) -> float:
        """Compile (when ``compile=True``) and run ``iters`` times for [batch, C, height, width] inputs.

        Registers ``batch`` as a shape bucket for (height, width): smaller batches of that size are padded
        to it. Returns the seconds spent (compile + the runs), also recorded in ``compile_log``.
        """
        if batch < 1 or height % self.total_downsampling or width % self.total_downsampling:
            raise ValueError(f"warmup needs batch >= 1 and H, W multiples of {self.total_downsampling}; "
                             f"got {batch}x{height}x{width}")
        if self.compiled:
            sizes = self._buckets.setdefault((height, width), [])
            if batch not in sizes:
                sizes.append(batch)
        x = torch.zeros(batch, self.config.in_channels, height, width, device=self.device)
        t = torch.full((batch,), self.num_steps // 2, dtype=torch.long, device=self.device)
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(iters):
                self(x, t)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def extra_repr(self) -> str:
        s = self.schedule
        return (f"name={self.name!r}, family={self.config.family!r}, schedule={s.name} {s.num_steps} steps, "
                f"t_input={'float t*1000/T' if s.rescale_timesteps else 'integer t'}, dtype={self.dtype}, "
                f"mode={self.mode!r}, channels_last={self.channels_last}, eps_only={self.eps_only}, "
                f"conv_algo={self.unet.conv_algo!r}, fused_norm={self.unet.fused_norm}, compile={self.compiled}")


def _compile(fn, device: torch.device):
    """torch.compile for fixed shapes: CPU Inductor with frozen (pre-packed) weights, GPU max-autotune
    (which also captures CUDA graphs)."""
    if device.type == "cuda":
        return torch.compile(fn, dynamic=False, mode="max-autotune")
    # freezing folds the (requires_grad=False) weights into the graph as constants so Inductor can
    # pre-pack them for oneDNN once, instead of per call.
    return torch.compile(fn, dynamic=False, options={"freezing": True})




def load_denoiser(
    checkpoint: str | os.PathLike | StateDict,
    preset: str | UNetConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    schedule: Schedule | None = None,
    mode: str = "fast",
    channels_last: bool | None = False,
    eps_only: bool = False,
    conv_algo: str = "direct",
    fused_norm: bool = False,
    compile: bool = False,
) -> Denoiser:
    """Load an OpenAI ADM checkpoint (guided-diffusion or improved-diffusion) into our UNet.

    checkpoint: path to a .pt/.pth state_dict (read with weights_only=True) or .safetensors, or a state_dict.
    preset: a name from ``PRESETS``, a ``UNetConfig``, or None: the architecture and schedule of the JSON
        sidecar beside a checkpoint trained by ``python -m diffaug_fast.train_denoiser``, else the preset the
        weights fit exactly. A file that fits no preset and has no sidecar raises CheckpointError (its schedule
        and heads are not in the weights); an in-memory state_dict is then inferred with a warning.
    dtype: float32, or float16/bfloat16 for the block convolutions (GroupNorm, the timestep MLP and the
    output layer stay float32, as guided-diffusion's fp16 mode does).
    schedule: override the preset's noise schedule / timestep convention.
    mode, channels_last, eps_only, conv_algo, fused_norm, compile: how the UNet is executed, see ``Denoiser``.
    """
    if dtype not in (torch.float32, *_LOW_PRECISION):
        raise TypeError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    where = "state_dict"
    if isinstance(checkpoint, (str, os.PathLike)):
        where = str(checkpoint)
        sd = read_state_dict(checkpoint)
    elif isinstance(checkpoint, Mapping):
        sd = _as_state_dict(checkpoint, "the given mapping")
    else:
        raise TypeError(f"checkpoint must be a path or a state_dict, got {type(checkpoint).__name__}")

    from_file = isinstance(checkpoint, (str, os.PathLike))
    side = read_sidecar(checkpoint) if from_file and preset is None else None
    if side is not None:
        config, sched, _ = side
        name = "custom"  # a name is a preset's or "custom": the bank reloads by it (None for "custom")
        schedule = schedule or sched
    elif preset is None:
        with warnings.catch_warnings():
            if from_file:  # refused below instead of warned about
                warnings.simplefilter("ignore")
            config, name = infer_config(sd)
        if from_file and name == "custom":
            # the schedule and head count are not in the weights: guessing them loads another model in silence
            raise CheckpointError(
                f"{checkpoint} fits no preset and has no {sidecar_path(checkpoint).name} beside it (a "
                "train_denoiser model.pt copied without its .json?), so its noise schedule and attention heads are "
                f"unknown (the weights alone suggest a {config.family} UNet with model_channels="
                f"{config.model_channels}, channel_mult={config.channel_mult}): put the .json back beside it, or "
                "pass preset= (a name or a UNetConfig; train/rn50.py: --unet-preset)")
    elif isinstance(preset, UNetConfig):
        config, name = preset, "custom"
    else:
        config, name = get_preset(preset), preset
    what = ("the architecture in " + str(sidecar_path(checkpoint)) if side is not None else
            f"preset {name!r}" if name != "custom" else "the given UNetConfig")
    check_state_dict(sd, config, what)
    check_finite_weights(sd, where)

    with torch.device("meta"):
        unet = UNet(config)
    # assign=True adopts the checkpoint's (possibly memory-mapped) tensors instead of copying into fresh ones.
    unet.load_state_dict(sd, strict=True, assign=True)
    unet = unet.to(device=device, dtype=torch.float32)  # a no-op for float32 (mmapped) CPU tensors
    if dtype in _LOW_PRECISION:
        unet.set_compute_dtype(dtype)
    den = Denoiser(unet, schedule, name, mode=mode, channels_last=channels_last, eps_only=eps_only,
                   conv_algo=conv_algo, fused_norm=fused_norm, compile=compile)
    den.source = where
    return den
