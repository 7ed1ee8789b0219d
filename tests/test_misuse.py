"""Misuse outside the trainer: images that became unreadable after the scan, non-finite
explicit noise, numpy integer timesteps, seeds at both ends of 64 bits, non-finite weights, and a
checkpoint one shape away from a preset. Tiny: adm-tiny with random weights, 16-24 px images."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from conftest import oracle_model_and_diffusion, randomize_
from PIL import Image

import diffaug_fast as df
from diffaug_fast.data import available_backends, build_loader, scan_dataset
from diffaug_fast.diffusion.denoiser import CheckpointError
from diffaug_fast.ops.philox import philox_normal

# ---------------------------------------------------------------------------------------------------- files


def _tree(root) -> str:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return str(root)


def _unreadable(path: str, how: str) -> None:
    """What an unreadable file looks like to root (chmod 000 does not stop root): keep the folder's mtime,
    as a chmod would, so the scan cache key cannot see the change."""
    st = os.stat(os.path.dirname(path))
    os.remove(path)
    if how == "directory":
        os.mkdir(path)
    elif how == "dangling symlink":
        os.symlink(path + ".gone", path)
    os.utime(os.path.dirname(path), ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("how", ["directory", "dangling symlink"])
def test_cached_scan_rescans_a_file_that_became_unreadable(tmp_path, how):
    tree, cache = _tree(tmp_path / "t"), tmp_path / "cache"
    first = scan_dataset(tree, cache=cache, progress=False)
    victim = first.files[5]
    _unreadable(victim, how)
    again = scan_dataset(tree, cache=cache, progress=False)
    assert victim not in again.files and len(again.files) == 7
    if how == "dangling symlink":  # still listed as a file, cached as good: rescanned and reported
        assert [(p, r.split(":")[0]) for p, r in again.bad] == [(victim, "unreadable")]
    else:  # a folder now: the listing (and so the cache key) changed, nothing to report
        assert again.bad == []
    assert scan_dataset(tree, cache=cache, progress=False).bad == again.bad  # the cache now holds it


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loader_skips_and_names_images_gone_since_the_scan(tmp_path, backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    tree = _tree(tmp_path / "t")
    index = scan_dataset(tree, cache=False, progress=False)
    gone = {1: index.files[1], 6: index.files[6]}
    _unreadable(gone[1], "directory")
    os.remove(gone[6])
    loader = build_loader(index, "train", batch_size=4, backend=backend, crop_size=16, resize_size=20,
                          num_workers=1, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = [i for batch in loader for i in batch["index"].tolist()]
        for batch in loader:  # the next epoch: skipped again, named once only
            assert batch["clean"].shape[0] == batch["label"].shape[0] == batch["index"].shape[0]
    assert sorted(seen) == [i for i in range(8) if i not in gone]
    named = [str(w.message) for w in caught if "cannot be read any more" in str(w.message)]
    assert sorted(named) == sorted(f"skipped {p}: it cannot be read any more (changed after the scan); rescan "
                                   "the dataset to drop it for good" for p in gone.values())
    assert loader.skipped == gone


# ---------------------------------------------------------------------------------------------------- augment


@pytest.fixture(scope="module")
def den():
    unet, _ = oracle_model_and_diffusion(df.get_preset("adm-tiny"))
    randomize_(unet, seed=2)
    return df.load_denoiser(unet.state_dict(), "adm-tiny")


def _x(b=2, size=16):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_explicit_noise_is_refused_like_x(den, bad):
    x = _x()
    noise = torch.randn(x.shape)
    noise[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match=r"noise contains non-finite values \(NaN or inf\)"):
        df.augment(x, den, t=10, noise=noise)
    x_bad = x.clone()
    x_bad[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"x contains non-finite values \(NaN or inf\)"):
        df.augment(x_bad, den, t=10)


def test_numpy_integer_t_equals_int_t(den):
    x = _x()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    want = df.augment(x, den, t=37, noise=noise)
    for t in (np.int64(37), np.int32(37), np.uint16(37), np.array([37, 37])):
        assert torch.equal(df.augment(x, den, t=t, noise=noise), want)
    with pytest.raises(TypeError, match="float64"):
        df.augment(x, den, t=np.array([1.5, 2.0]), noise=noise)
    with pytest.raises(ValueError, match="t out of range"):
        df.augment(x, den, t=np.int64(2**62), noise=noise)


def test_seeds_are_taken_modulo_2_64_at_both_ends(den):
    """Any integer seed is the Philox key seed mod 2**64, checked against the reference generator
    (ops/philox.py) drawing the same noise explicitly: both ends of the signed and unsigned ranges, and
    seeds past 64 bits (which overflowed before)."""
    x = _x(b=1)
    cases = {2**63 - 1: [2**63 - 1], 2**63: [2**63, -(2**63)], 2**64 - 1: [2**64 - 1, -1, np.uint64(2**64 - 1)],
             5: [2**64 + 5]}
    for key, seeds in cases.items():
        ref = df.augment(x, den, t=500, noise=philox_normal(tuple(x.shape), key))
        for seed in seeds:
            got = df.augment(x, den, t=500, seed=seed)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"seed {seed!r}")
    last = 2**63 - x.numel()
    df.augment(x, den, t=500, seed=1, offset=last - 1)  # the largest offset whose counters fit int64
    with pytest.raises(ValueError, match="offset must lie in"):
        df.augment(x, den, t=500, seed=1, offset=last)
    with pytest.raises(TypeError, match="seed must be an int"):
        df.augment(x, den, t=500, seed=1.0)


# ---------------------------------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def tiny_sd():
    unet, _ = oracle_model_and_diffusion(df.get_preset("adm-tiny"))
    randomize_(unet, seed=4)
    return {k: v.clone() for k, v in unet.state_dict().items()}


def test_non_finite_weights_are_named(tiny_sd, tmp_path):
    sd = {k: v.clone() for k, v in tiny_sd.items()}
    sd["input_blocks.1.0.in_layers.2.weight"][0, 0, 0, 0] = float("nan")
    sd["out.2.bias"][1] = float("inf")
    torch.save(sd, tmp_path / "nan.pt")
    for preset in ("adm-tiny", None):
        with pytest.raises(CheckpointError) as e:
            df.load_denoiser(tmp_path / "nan.pt", preset)
        msg = str(e.value)
        assert "non-finite weights (NaN or inf) in 2 tensor(s)" in msg and str(tmp_path / "nan.pt") in msg
        assert "input_blocks.1.0.in_layers.2.weight (1 of" in msg and f"out.2.bias (1 of {sd['out.2.bias'].numel()})" in msg


def test_one_wrong_shape_names_the_nearest_preset_and_its_keys(tiny_sd):
    sd = dict(tiny_sd)
    key = "input_blocks.1.0.in_layers.2.weight"
    sd[key] = torch.zeros(33, *sd[key].shape[1:])  # one output channel too many
    with pytest.raises(CheckpointError) as e:
        df.load_denoiser(sd)
    msg = str(e.value)
    want = tuple(tiny_sd[key].shape)
    assert "the nearest preset is 'adm-tiny', which differs in 1 key(s)" in msg
    assert f"{key} has shape {(33, *want[1:])}, preset {want}" in msg
