"""--precision: low-precision DiffAug views stay within a rounding of the float32 ones, and the UNet-heavy
command lines take the flag (one-line refusals for what a device cannot run)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

import diffaug_fast as df
from diffaug_fast.diffusion.unet import UNet, UNetConfig
from diffaug_fast.hardware import PRECISIONS

# a UNet small enough that emulated bf16 (AVX2 CPUs) runs in about a second; attention and up/down resblocks
# included, so every block kind runs in low precision
TINY = UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_ds=(2,), num_head_channels=8,
                  resblock_updown=True, image_size=16, family="guided-diffusion")
TIMESTEPS = (0, 50, 100, 150, 200, 300, 400, 450)  # DiffAug Ensemble's range; x0 error grows with t (1/sqrt(abar))


@pytest.fixture(scope="module")
def tiny_state_dict():
    return randomize_(UNet(TINY), seed=3).state_dict()


def _low_precisions(device: torch.device) -> list[torch.dtype]:
    if device.type == "cpu":
        return [torch.bfloat16]  # fp16 convolutions are refused on CPUs (hardware.resolve_precision)
    return [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])


def test_low_precision_x0_within_a_pixel_level_of_fp32(device, tiny_state_dict):
    """augment() with a bf16 (fp16 on GPU) UNet against the same op with the float32 UNet, the same t and
    Philox noise: the mean |x0 error| is at most 1/255 of the [0, 1] range at every t (measured on CPU bf16:
    0.08 levels at t = 0 up to 0.40 at t = 450, 0.26 overall)."""
    x = (torch.rand(len(TIMESTEPS), 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    t = torch.tensor(TIMESTEPS, device=device)
    ref = df.augment(x, df.load_denoiser(tiny_state_dict, TINY, device=device), t=t, seed=5)
    assert ref.abs().mean() > 0.1  # a real image, not a constant that any precision reproduces
    for dtype in _low_precisions(device):
        den = df.load_denoiser(tiny_state_dict, TINY, device=device, dtype=dtype)
        low = df.augment(x, den, t=t, seed=5)
        levels = (low.float() - ref).abs().mean(dim=(1, 2, 3)) * 127.5  # [-1, 1] -> 0..255 pixel levels
        assert (levels > 0).all(), f"{dtype}: identical to float32, the low-precision path did not run"
        assert (levels <= 1.0).all(), f"{dtype}: mean |x0 error| per t {dict(zip(TIMESTEPS, levels.tolist()))}"


def test_cli_flags_parse_and_refuse(tmp_path):
    from diffaug_fast.bank.cli import main as bank_main
    from diffaug_fast.eval import certify, evaluate
    from diffaug_fast.eval.study import _parser

    for parse in (evaluate.parse_args, lambda argv: certify.parse_args([*argv, "--data", "d"])):
        assert parse(["--ckpt", "c"]).precision == "fp32"
        assert parse(["--ckpt", "c", "--amp"]).precision == "auto"  # the older spelling
        for name in (*PRECISIONS, "auto"):
            assert parse(["--ckpt", "c", "--precision", name]).precision == name
        with pytest.raises(SystemExit):
            parse(["--ckpt", "c", "--precision", "fp8"])
    assert _parser().parse_args(["--eval-precision", "bf16"]).eval_precision == "bf16"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="fp16: CPUs have no fast float16"):
            evaluate.main(["--ckpt", "missing.pt", "--val", ".", "--precision", "fp16", "--out", str(tmp_path)])
    # the bank records half precision as the device's native dtype: another one is refused before any work
    other = "fp16" if not torch.cuda.is_available() else "bf16"
    with pytest.raises(SystemExit, match=f"--precision {other}: the bank builds in"):
        bank_main(["build", "--data", "d", "--unet", "u", "--out", "o", "--precision", other])
