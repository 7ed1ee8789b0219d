"""Full-size adm256-uncond (552 M parameters) against the guided_diffusion oracle at 224x224.

The heaviest tests of the suite (~3 minutes on 2 cores): one random-weight checkpoint written in the
official format, shared by every test of this module.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import oracle_model_and_diffusion, randomize_
from test_checkpoint import _RSS_PROBE

import diffaug_fast as df

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    torch.manual_seed(0)
    cfg = df.get_preset("adm256-uncond")
    oracle, diffusion = oracle_model_and_diffusion(cfg)
    randomize_(oracle, seed=123)
    path = tmp_path_factory.mktemp("adm256") / "256x256_diffusion_uncond.pt"
    torch.save(oracle.state_dict(), path)
    den = df.load_denoiser(path)  # architecture inferred from the file
    yield oracle, diffusion, den, path
    path.unlink()


def test_checkpoint_loads_strict_and_is_recognised(full):
    oracle, _, den, path = full
    assert den.name == "adm256-uncond"
    assert den.schedule.name == "linear" and den.num_steps == 1000 and not den.schedule.rescale_timesteps
    ours = den.unet.state_dict()
    theirs = oracle.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ("input_blocks.0.0.weight", "out.2.bias",
                                                          "middle_block.1.qkv.weight"))
    explicit = df.load_denoiser(path, "adm256-uncond")
    assert explicit.name == "adm256-uncond"


def test_forward_224_matches_oracle(full):
    oracle, _, den, _ = full
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([437])
    with torch.no_grad():
        ref = oracle(x, t)
        out = den(x, t)
    assert out.shape == (1, 6, 224, 224)
    assert ref.abs().mean() > 0.05
    assert (out - ref).abs().max().item() <= 1e-4


def test_augment_224_matches_p_sample(full):
    oracle, diffusion, den, _ = full
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 224, 224, generator=g) * 2 - 1
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    with torch.no_grad():
        ref = diffusion.p_sample(oracle, diffusion.q_sample(x, t, noise), t, clip_denoised=True)["pred_xstart"]
    ours = df.augment(x, den, t=t, noise=noise)
    err = (ours - ref).abs().amax(dim=(1, 2, 3))
    # float32 rounding of eps is multiplied by sqrt(1/abar_t - 1) in the x0 step (157 at t = 999): the bound
    # scales with that gain. A flat 1e-4 held on the AVX2 machines and missed by 3% (1.03e-4 at t = 999) on an
    # AVX-512/AMX one, whose oneDNN convolutions sum in another order.
    gain = torch.from_numpy(den.schedule.sqrt_recipm1_alphas_cumprod).float()[t]
    bound = 1e-6 + 2e-6 * torch.clamp(gain, min=1.0)
    assert (err <= bound).all(), f"max |diff| per t {dict(zip(t.tolist(), err.tolist()))}, bound {bound.tolist()}"


def test_full_checkpoint_loads_without_copying(full):
    _, _, _, path = full
    res = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path)], capture_output=True, text=True, check=True)
    grew_kb, n_params = map(int, res.stdout.split())
    assert n_params == 552_814_086
    assert grew_kb < 0.25 * path.stat().st_size / 1024
