"""bench/gpu_check.py (``make gpu-check``) where it can be checked without a GPU: the one-line answer on a
machine without one, and the summary block's verdicts from benchmark rows shaped like pytest-benchmark's
JSON (params + extra_info, as bench_kernels / bench_unet / bench_loader write them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_a_gpu_one_line_and_exit_0(monkeypatch, capsys, tmp_path):
    import torch

    gc = _gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a CPU-only machine answers
    assert gc.main(["--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA GPU" in out, out
    assert not (tmp_path / "out").exists()  # nothing was run


def test_summary_verdicts():
    gc = _gpu_check()
    unet = [dict(name="test_unet[adm256-uncond-ours-fp16-fast]", preset="adm256-uncond", case="ours-fp16-fast",
                 img_per_s=300.0, peak_fraction=0.62),
            dict(name="test_unet[adm256-uncond-ref-fp16]", preset="adm256-uncond", case="ref-fp16", img_per_s=150.0,
                 peak_fraction=0.31),
            dict(name="test_unet[adm256-uncond-ours-bf16-fast]", preset="adm256-uncond", case="ours-bf16-fast",
                 img_per_s=200.0, peak_fraction=0.41)]
    kern = [dict(case="pre_philox", backend="reference", fraction_of_copy=0.9),  # the reference never counts
            dict(case="pre_philox", backend="cuda", fraction_of_copy=0.55, speedup_vs_reference=6.0),
            dict(case="pre_philox", backend="triton", fraction_of_copy=0.71, speedup_vs_reference=7.5),
            dict(case="post_norm_slice", backend="cuda-prealloc", fraction_of_copy=0.8, speedup_vs_reference=9.0)]
    loader = [dict(name="test_reference_torchvision", img_per_s=1000.0),
              dict(name="test_ours[dali-mixed]", backend="dali-mixed", img_per_s=4000.0),
              dict(name="test_ours[dali]", backend="dali", img_per_s=1400.0)]
    train = dict(baseline=0.10, bank=0.19, online=0.40, unet=0.15, batch=64)  # bound 0.35: ratio 1.14
    lines = gc.summary(kern, unet, loader, train, "12 passed", "a GPU")
    text = "\n".join(lines)
    assert "12 passed" in lines[1]

    def met(prefix):
        (line,) = [ln for ln in lines if ln.strip().startswith(prefix)]
        return line.endswith(" met") and not line.endswith("NOT met")

    assert met("UNet adm256 fp16") and "150 img/s" in text  # the reference beside ours
    assert not met("UNet adm256 bf16")
    assert met("fused pre_philox (best: triton)") and "71% of copy" in text
    assert met("fused post_norm_slice (best: cuda-prealloc)")
    assert any("fused pre_u8_nhwc" in ln and ln.endswith("n/a") for ln in lines)  # not measured: said so
    assert met("DiffAug online step / bound") and "1.143" in text
    assert met("bank mode / baseline") and "1.05x" in text  # 128 / 0.19 s vs 64 / 0.10 s
    assert met("DALI two-view, mixed") and "4.00x torchvision" in text
    assert not met("DALI two-view, CPU decode")  # 1.40x < 1.5x
