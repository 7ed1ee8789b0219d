"""diffaug-fast: DiffAug (diffuse-and-denoise augmentation) with OpenAI ADM denoisers, fast.

Public API:
    load_denoiser(checkpoint, preset=None, *, device="cpu", dtype=torch.float32) -> Denoiser
    augment(x, denoiser, *, t=None, noise=None, generator=None, t_range=None, clip=True,
            mean=None, std=None, seed=None, offset=0, out=None, backend=None) -> x0_hat
    DiffAug(denoiser, *, t_range=None, mean=None, std=None, seed=None, backend=None): nn.Module for training
    available_backends(device) -> backends of the fused ops usable on that device
    PRESETS, UNetConfig, UNet, Schedule, CheckpointError
"""

from .augment import augment
from .denoiser import CheckpointError, Denoiser, load_denoiser
from .module import DiffAug
from .ops.fused import Workspace, available_backends
from .schedule import Schedule, make_schedule
from .unet import PRESETS, UNet, UNetConfig, get_preset

__version__ = "0.1.0"

__all__ = [
    "augment",
    "DiffAug",
    "available_backends",
    "Workspace",
    "load_denoiser",
    "Denoiser",
    "CheckpointError",
    "Schedule",
    "make_schedule",
    "PRESETS",
    "UNet",
    "UNetConfig",
    "get_preset",
    "__version__",
]
