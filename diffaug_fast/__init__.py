"""diffaug-fast: DiffAug (diffuse-and-denoise augmentation) with OpenAI ADM denoisers, fast.

Public API:
    load_denoiser(checkpoint, preset=None, *, device="cpu", dtype=torch.float32) -> Denoiser
    augment(x, denoiser, *, t=None, noise=None, generator=None, t_range=None, clip=True,
            mean=None, std=None, seed=None, offset=0, out=None, backend=None) -> x0_hat
    DiffAug(denoiser, *, t_range=None, mean=None, std=None, seed=None, backend=None): nn.Module for training
    available_backends(device) -> backends of the fused ops usable on that device
    Smooth: randomized smoothing / diffusion denoised smoothing (predict, certify)
    ood: OOD detectors and metrics (ood.metrics as OpenOOD's evaluator)
    PRESETS, UNetConfig, UNet, Schedule, CheckpointError

The package's folders: ops/ (the op and its kernels), diffusion/ (schedule, UNet, checkpoint loading,
diffusion loss), data/ (scan, loaders, synthetic data), train/ (the training core, classifier engine and
recipes, denoiser training), eval/ (DiffAug Ensemble, ImageNet-C, OOD, smoothing, classifier loading), bank/.
"""

from . import _compat
from .diffusion.denoiser import CheckpointError, Denoiser, load_denoiser
from .diffusion.schedule import Schedule, make_schedule
from .diffusion.unet import PRESETS, UNet, UNetConfig, get_preset
from .eval import ood
from .eval.smoothing import Smooth
from .ops.augment import augment
from .ops.fused import Workspace, available_backends
from .ops.module import DiffAug

_compat.install()

__version__ = "0.1.0"

__all__ = [
    "augment",
    "DiffAug",
    "available_backends",
    "Workspace",
    "load_denoiser",
    "Denoiser",
    "CheckpointError",
    "Smooth",
    "ood",
    "Schedule",
    "make_schedule",
    "PRESETS",
    "UNet",
    "UNetConfig",
    "get_preset",
    "__version__",
]
