"""diffaug-fast: DiffAug (diffuse-and-denoise augmentation) with OpenAI ADM denoisers, fast.

Public API:
    load_denoiser(checkpoint, preset=None, *, device="cpu", dtype=torch.float32) -> Denoiser
    augment(x, denoiser, *, t=None, noise=None, generator=None, t_range=None, clip=True) -> x0_hat
    PRESETS, UNetConfig, UNet, Schedule, CheckpointError
"""

from .augment import augment
from .denoiser import CheckpointError, Denoiser, load_denoiser
from .schedule import Schedule, make_schedule
from .unet import PRESETS, UNet, UNetConfig, get_preset

__version__ = "0.1.0"

__all__ = [
    "augment",
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
