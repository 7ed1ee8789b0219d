"""Shared test helpers: the guided_diffusion oracle built from our configs, random official checkpoints."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings

import pytest
import torch

from diffaug_fast.diffusion.unet import UNetConfig

warnings.filterwarnings("ignore", category=FutureWarning, module="guided_diffusion")

# The device dimension of the suite. A test whose subject is device-generic takes the ``device``
# fixture and runs on cpu and, where torch sees a GPU, on cuda; on a CPU-only machine the cuda cases are
# reported as skipped with this one reason, so the skip count shows what was not run. GPU-only cases carry
# ``@requires_cuda``.
HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA GPU on this machine (torch.cuda.is_available() is False): GPU case not run"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.gpu])]
TWO_GPUS = HAS_CUDA and torch.cuda.device_count() >= 2

# Triton decides at decoration time (when triton_augment is first imported) whether a kernel is compiled
# or interpreted, for the whole process. On a CPU-only machine the interpreter is the only way to run the
# Triton kernels, on CPU tensors; on a GPU machine it stays off, so the suite runs the compiled kernels on
# CUDA tensors (the Triton-on-CPU cases then skip, naming this). $TRITON_INTERPRET set by hand wins.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """torch.device("cpu"), then torch.device("cuda") where a GPU exists (skipped with a reason elsewhere).

    On cuda, TF32 is off for the test (PyTorch enables it for cuDNN convolutions by default, ~1e-3 relative
    error), so float32 on the GPU is float32 and the CPU tolerances, which are float32 rounding, apply."""
    dev = torch.device(request.param)
    with full_fp32(dev):
        yield dev


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """Disable TF32 matmuls/convolutions on CUDA while inside (a no-op on CPU)."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def native_backend(device: torch.device) -> str:
    """The compiled fused-op backend of ``device``: "cuda" on CUDA tensors, "cpp" on CPU tensors."""
    return "cuda" if torch.device(device).type == "cuda" else "cpp"


def backend_on(name: str, device: torch.device) -> str:
    """Resolve a backend parameter ("native", "triton", "reference") for ``device``; skip, naming why,
    where it cannot run there (extension not built, Triton on CPU without the interpreter)."""
    from diffaug_fast.ops import fused

    name = native_backend(device) if name == "native" else name
    why = fused.BACKENDS[name].missing(torch.device(device).type)
    if why is not None:
        pytest.skip(f"backend {name!r} on {torch.device(device).type}: {why}")
    return name



def oracle_model_and_diffusion(cfg: UNetConfig):
    """OpenAI's UNetModel + SpacedDiffusion configured like ``cfg`` (the independent reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from guided_diffusion.script_util import create_gaussian_diffusion
        from guided_diffusion.unet import UNetModel

    model = UNetModel(
        image_size=cfg.image_size,
        in_channels=cfg.in_channels,
        model_channels=cfg.model_channels,
        out_channels=cfg.out_channels,
        num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=cfg.attention_ds,
        dropout=cfg.dropout,
        channel_mult=cfg.channel_mult,
        conv_resample=cfg.conv_resample,
        num_classes=cfg.num_classes,
        num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels,
        num_heads_upsample=cfg.num_heads_upsample,
        use_scale_shift_norm=cfg.use_scale_shift_norm,
        resblock_updown=cfg.resblock_updown,
        use_new_attention_order=cfg.use_new_attention_order,
    )
    diffusion = create_gaussian_diffusion(
        steps=cfg.diffusion_steps,
        learn_sigma=cfg.learn_sigma,
        noise_schedule=cfg.noise_schedule,
        rescale_timesteps=cfg.rescale_timesteps,
    )
    return model.eval(), diffusion


def oracle_low_precision(oracle: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of the oracle as the reference code runs the released use_fp16=True checkpoint: the torso
    convs cast (guided-diffusion's convert_to_fp16, or its bf16 analogue); call it under autocast."""
    model = copy.deepcopy(oracle)
    for blocks in (model.input_blocks, model.middle_block, model.output_blocks):
        for m in blocks.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
                m.to(dtype)
    model.dtype = dtype
    return model


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values: OpenAI zero-initialises the last conv of each branch, which
    would make the output identically 0 and a parity test unable to fail. GroupNorm affine is perturbed
    too, so scale/shift mix-ups show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith(("in_layers.0.weight", "out_layers.0.weight",
                                                                  "out.0.weight", "in_layers.0.bias",
                                                                  "out_layers.0.bias", "out.0.bias"))):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                bound = 1.0 / fan_in**0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
    return model


@pytest.fixture
def tmp_ckpt(tmp_path):
    """Save a state_dict the way the official checkpoints are saved (plain torch.save of state_dict())."""

    def save(model: torch.nn.Module, name: str = "model.pt"):
        path = tmp_path / name
        torch.save(model.state_dict(), path)
        return path

    return save
