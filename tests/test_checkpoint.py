"""Checkpoint files are untrusted: safe loading, clear errors, formats, and memory on load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import oracle_model_and_diffusion, randomize_

import diffaug_fast as df
from diffaug_fast import CheckpointError


@pytest.fixture(scope="module")
def tiny_oracle():
    oracle, _ = oracle_model_and_diffusion(df.get_preset("adm-tiny"))
    return randomize_(oracle, seed=11)


def _out(den):
    x = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    with torch.no_grad():
        return den(x, torch.tensor([3, 800]))


class _Payload:
    """Unpickling this would create a directory: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_code_executing_pickle_is_refused_not_run(tmp_path, tiny_oracle):
    marker = tmp_path / "pwned"
    sd = dict(tiny_oracle.state_dict())
    sd["evil"] = _Payload(str(marker))
    path = tmp_path / "evil.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="refusing to load .*execute code"):
        df.load_denoiser(path)
    assert not marker.exists()


def test_safetensors_and_pt_load_the_same(tmp_path, tiny_oracle):
    from safetensors.torch import save_file

    pt, st = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save(tiny_oracle.state_dict(), pt)
    save_file({k: v.contiguous() for k, v in tiny_oracle.state_dict().items()}, str(st))
    a, b = df.load_denoiser(pt), df.load_denoiser(st)
    assert a.name == b.name == "adm-tiny"
    assert torch.equal(_out(a), _out(b))


def test_wrapped_and_ddp_prefixed_state_dicts(tmp_path, tiny_oracle):
    sd = tiny_oracle.state_dict()
    ref = _out(df.load_denoiser(sd))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "step": torch.tensor(5)}, tmp_path / "w.pt")
    assert torch.equal(_out(df.load_denoiser(tmp_path / "w.pt")), ref)


def test_legacy_non_zip_serialization(tmp_path, tiny_oracle):
    path = tmp_path / "legacy.pt"
    torch.save(tiny_oracle.state_dict(), path, _use_new_zipfile_serialization=False)
    assert torch.equal(_out(df.load_denoiser(path)), _out(df.load_denoiser(tiny_oracle.state_dict())))


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "text", "not_adm", "not_a_dict"])
def test_unreadable_checkpoints_give_clear_errors(tmp_path, tiny_oracle, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save(tiny_oracle.state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "not_adm":
        torch.save(torch.nn.Linear(3, 3).state_dict(), path)
    elif kind == "not_a_dict":
        torch.save([torch.zeros(3)], path)
    with pytest.raises(CheckpointError, match=str(path.name) if kind != "not_adm" else "not an ADM UNet"):
        df.load_denoiser(path)


def test_bad_arguments(tiny_oracle):
    with pytest.raises(TypeError, match="dtype"):
        df.load_denoiser(tiny_oracle.state_dict(), dtype=torch.int8)
    with pytest.raises(TypeError, match="path or a state_dict"):
        df.load_denoiser(12)
    with pytest.raises(ValueError, match="unknown UNet preset 'adm-huge'; known presets: adm-small"):
        df.load_denoiser(tiny_oracle.state_dict(), "adm-huge")


_RSS_PROBE = textwrap.dedent(
    """
    import sys, torch, diffaug_fast as df
    def kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
    before = kb("VmRSS:")
    den = df.load_denoiser(sys.argv[1])
    print(kb("VmHWM:") - before, sum(p.numel() for p in den.parameters()))
    """
)


def test_loading_does_not_copy_the_checkpoint_into_ram(tmp_path):
    """The model is built on the meta device and adopts the memory-mapped tensors: loading a checkpoint
    must not need its size again in private memory (let alone twice)."""
    cfg = df.get_preset("iddpm-imagenet64-uncond")
    with torch.device("meta"):
        meta = df.UNet(cfg)
    sd = {k: torch.zeros(v.shape) for k, v in meta.state_dict().items()}
    path = tmp_path / "big.pt"
    torch.save(sd, path)
    size_kb = path.stat().st_size / 1024
    del sd
    res = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path)], capture_output=True, text=True, check=True)
    grew_kb, n_params = map(int, res.stdout.split())
    assert n_params == sum(v.numel() for v in meta.state_dict().values())
    assert size_kb > 400_000  # a ~0.5 GB checkpoint, so the bound below is meaningful
    assert grew_kb < 0.25 * size_kb, f"peak RSS grew {grew_kb / 1024:.0f} MB loading a {size_kb / 1024:.0f} MB file"
