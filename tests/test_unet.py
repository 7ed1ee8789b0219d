"""Our ADM UNet against OpenAI's guided_diffusion UNetModel (the oracle), at small sizes.

The full-size adm256-uncond checks live in test_full_size.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import oracle_model_and_diffusion, randomize_

import diffaug_fast as df
from diffaug_fast.diffusion.denoiser import CheckpointError, infer_config
from diffaug_fast.diffusion.unet import UNet, count_parameters

SMALL = ["adm-tiny", "iddpm-tiny", "adm-small"]


def _oracle_call(model, cfg, x, t):
    ts = t.float() * (1000.0 / cfg.diffusion_steps) if cfg.rescale_timesteps else t
    with torch.no_grad():
        return model(x, ts)


@pytest.mark.parametrize("name", list(df.PRESETS))
def test_state_dict_keys_and_shapes_equal_oracle(name):
    cfg = df.get_preset(name)
    oracle, _ = oracle_model_and_diffusion(cfg) if name != "adm256-uncond" else (None, None)
    with torch.device("meta"):
        ours = UNet(cfg)
        if oracle is None:  # build the big oracle on meta too: only keys and shapes are compared here
            oracle, _ = oracle_model_and_diffusion(cfg)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in oracle.state_dict().items()}
    assert list(a) == list(b)
    assert a == b


def test_adm256_parameter_count_matches_release():
    with torch.device("meta"):
        m = UNet(df.get_preset("adm256-uncond"))
    assert count_parameters(m) == 552_814_086
    assert len(m.state_dict()) == 566


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("new_order", [False, True])
def test_forward_matches_oracle(name, new_order, tmp_ckpt, device):
    """Our UNet loaded on ``device`` against the oracle on the CPU: float32 rounding (on cuda, with TF32
    off, the convolutions' other summation order: 2e-5 of the output's scale, as the fast-mode tests)."""
    cfg = replace(df.get_preset(name), use_new_attention_order=new_order)
    oracle, _ = oracle_model_and_diffusion(cfg)
    randomize_(oracle, seed=1)
    path = tmp_ckpt(oracle)
    den = df.load_denoiser(path, cfg, device=device)
    g = torch.Generator().manual_seed(0)
    size = 64 if cfg.total_downsampling <= 8 else 96
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    t = torch.tensor([0, cfg.diffusion_steps - 1])
    ref = _oracle_call(oracle, cfg, x, t)
    with torch.no_grad():
        out = den(x.to(device), t.to(device)).cpu()
    assert out.shape == ref.shape == (2, cfg.out_channels, size, size)
    assert ref.abs().mean() > 0.05  # random weights: a non-trivial output
    atol = 1e-5 if device.type == "cpu" else 2e-5 * ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)


def test_attention_layouts_differ():
    """Loading a legacy-order checkpoint as new-order must change the output: the layout is real."""
    cfg = df.get_preset("adm-tiny")
    oracle, _ = oracle_model_and_diffusion(cfg)
    randomize_(oracle, seed=2)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    t = torch.tensor([10])
    legacy = df.load_denoiser(oracle.state_dict(), cfg)
    new = df.load_denoiser(oracle.state_dict(), replace(cfg, use_new_attention_order=True))
    with torch.no_grad():
        assert (legacy(x, t) - new(x, t)).abs().max() > 1e-3


def test_class_conditional_and_no_scale_shift():
    cfg = replace(df.get_preset("adm-tiny"), num_classes=10, use_scale_shift_norm=False)
    oracle, _ = oracle_model_and_diffusion(cfg)
    randomize_(oracle, seed=3)
    with pytest.warns(UserWarning, match="matches no preset"):
        den = df.load_denoiser(oracle.state_dict())  # inferred: no preset has classes
    assert den.config.num_classes == 10 and not den.config.use_scale_shift_norm
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    t = torch.tensor([5, 600])
    y = torch.tensor([1, 7])
    with torch.no_grad():
        ref = oracle(x, t, y)
        out = den.unet(x, t, y)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="class-conditional"):
        den.unet(x, t)


@pytest.mark.parametrize("name", list(df.PRESETS))
def test_infer_config_finds_each_preset(name):
    with torch.device("meta"):
        sd = UNet(df.get_preset(name)).state_dict()
    cfg, found = infer_config(sd)
    assert found == name
    assert cfg == df.get_preset(name)


def test_infer_config_custom_architecture_warns():
    cfg = df.UNetConfig(model_channels=64, num_res_blocks=2, channel_mult=(1, 2, 2), attention_ds=(4,),
                        num_head_channels=64, resblock_updown=True)
    with torch.device("meta"):
        sd = UNet(cfg).state_dict()
    with pytest.warns(UserWarning, match="matches no preset"):
        got, name = infer_config(sd)
    assert name == "custom"
    assert (got.model_channels, got.num_res_blocks, got.channel_mult, got.attention_ds) == (64, 2, (1, 2, 2), (4,))


def test_wrong_preset_names_keys_and_shapes(tmp_ckpt):
    oracle, _ = oracle_model_and_diffusion(df.get_preset("iddpm-tiny"))
    path = tmp_ckpt(oracle)
    with pytest.raises(CheckpointError) as e:
        df.load_denoiser(path, "adm-tiny")
    msg = str(e.value)
    assert "preset 'adm-tiny'" in msg
    assert "missing keys" in msg and "unexpected keys" in msg
    assert "looks like preset 'iddpm-tiny'" in msg
    # same family, other size: shapes differ
    with torch.device("meta"):
        sd = UNet(df.get_preset("adm-small")).state_dict()
    with pytest.raises(CheckpointError, match="wrong shapes"):
        df.load_denoiser(sd, "adm256-uncond")


def test_loaded_denoiser_is_frozen(tmp_ckpt):
    oracle, _ = oracle_model_and_diffusion(df.get_preset("adm-tiny"))
    den = df.load_denoiser(tmp_ckpt(oracle))
    assert not den.training and not den.unet.training
    torch.nn.Sequential(den).train()  # a parent switched to train() must not turn dropout on
    assert not den.training and not den.unet.training
    assert all(not p.requires_grad for p in den.parameters())
    assert "adm-tiny" in repr(den)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp32(dtype, device):
    """The low-precision mode keeps GroupNorm, the timestep MLP and `out` in float32 (guided's fp16)."""
    cfg = df.get_preset("adm-tiny")
    oracle, _ = oracle_model_and_diffusion(cfg)
    randomize_(oracle, seed=4)
    ref = df.load_denoiser(oracle.state_dict(), device=device)
    low = df.load_denoiser(oracle.state_dict(), dtype=dtype, device=device)
    assert low.dtype == dtype
    assert low.unet.out[2].weight.dtype == torch.float32
    assert low.unet.time_embed[0].weight.dtype == torch.float32
    assert low.unet.input_blocks[1][0].in_layers[2].weight.dtype == dtype
    x = torch.rand(2, 3, 32, 32, device=device) * 2 - 1
    t = torch.tensor([1, 999], device=device)
    with torch.no_grad():
        a, b = ref(x, t), low(x, t)
    assert b.dtype == torch.float32
    rel = (a - b).norm() / a.norm()
    assert rel < (2e-2 if dtype == torch.bfloat16 else 3e-3)
