"""`python -m diffaug_fast.demo`: DiffAug of the built-in sample images at several t, as a PNG grid.

Without ``--unet`` the denoiser is a random-weight UNet of a small preset: OpenAI initialises the last
layer to zero, so it predicts eps = 0 and each column shows x0_hat = x_t / sqrt(abar_t), the noise a
denoiser has to remove. Real DiffAug needs a pretrained checkpoint (guided-diffusion's
256x256_diffusion_uncond.pt): pass it with --unet.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import augment, load_denoiser
from .diffusion.denoiser import Denoiser
from .diffusion.unet import UNet, get_preset
from .viz import sample_images, save_grid

T_VALUES = (0, 100, 250, 500, 750, 999)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", help="checkpoint (.pt state_dict or .safetensors); default: random-weight preset")
    p.add_argument("--unet-preset", default=None, help="preset name (inferred from the checkpoint if omitted)")
    p.add_argument("--size", type=int, default=128, help="image side (multiple of the UNet's downsampling)")
    p.add_argument("--t", type=int, nargs="+", default=list(T_VALUES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_out/diffaug_grid.png")
    args = p.parse_args(argv)

    if args.unet:
        den = load_denoiser(args.unet, args.unet_preset)
        print(f"denoiser: {args.unet} ({den.name})")
    else:
        preset = args.unet_preset or "adm-small"
        torch.manual_seed(args.seed)
        den = Denoiser(UNet(get_preset(preset)), name=preset)
        print(f"denoiser: random-weight '{preset}' UNet. It predicts eps = 0, so the grid shows the noise a "
              "denoiser must remove;\n  real DiffAug needs a pretrained checkpoint: --unet 256x256_diffusion_uncond.pt")
    x = sample_images(args.size)
    g = torch.Generator().manual_seed(args.seed)
    cols, labels = [x], ["clean"]
    start = time.perf_counter()
    for t in args.t:
        cols.append(augment(x, den, t=t, generator=g))
        labels.append(f"t={t}")
    took = time.perf_counter() - start
    n = x.shape[0] * len(args.t)
    path = save_grid(cols, args.out, col_labels=labels,
                     row_labels=["landscape", "rings", "checker", "still life"],
                     title=f"DiffAug x0_hat, denoiser {den.name}")
    print(f"augmented {n} images at {args.size}x{args.size} in {took:.1f} s ({n / took:.2f} img/s); wrote {path}")
    return path


if __name__ == "__main__":
    main()
