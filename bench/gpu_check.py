"""`make gpu-check`: the suite's GPU cases and the GPU benchmarks, then ONE summary block of the compass
figures, each beside its goal.

    python bench/gpu_check.py [--skip-tests] [--skip-bench] [--out DIR]

Steps (each a subprocess with its own time limit, so one hang cannot eat the device time):
1. ``pytest tests -m gpu``: every cuda case of the device-generic tests and every GPU-only test. The
   compiled-UNet tests run with Inductor's autotuning limited to ATen kernels (they check the compiled
   path, CUDA graphs and buckets, not which conv kernel autotuning picks; full max-autotune of a UNet
   costs minutes per graph).
2. ``bench/bench_kernels.py`` (fused ops vs the reference chain, % of copy bandwidth measured in the same
   run), ``bench/bench_unet.py`` for adm256-uncond (random weights) at batch 64 and 224 px, fp16 and bf16
   and the fp32 reference (fraction of the matmul peak measured in the same run),
   ``bench/bench_loader.py`` (two-view loading: torchvision reference, DALI CPU, DALI "mixed").
3. The train step on the GPU (here, through the public API: bench_train.py is CPU-only): ResNet-50 fp16
   autocast + GradScaler, B = 64 clean images at 224; DiffAug online = augment of B views by adm256-uncond
   fp16 into the batch's second half + a classifier step on 2B; its bound = the UNet forward alone + 2 x
   the baseline step (bench_train.py's definition); bank mode = a classifier step on 2B with no UNet.

Exit status: 0 when every step ran and every test passed (a goal not met is reported, not an error);
1 when a test failed or a step failed or timed out; 0 after one line saying so on a machine without a
CUDA GPU (nothing to check there; `make test` covers the CPU). Raw outputs go to --out (default
gpu_check_out/): pytest logs and the benchmark JSON files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The goals each part was built to (bench/NOTES.md): the UNet >= 50% of the fp16 matmul peak on a GPU, the
# fused ops >= 60% of copy bandwidth, the DiffAug step <= 1.15 x its bound, bank mode >= 0.95 x baseline,
# DALI >= 1.5 x the torchvision reference.
GOAL_PEAK, GOAL_COPY, GOAL_BOUND, GOAL_BANK, GOAL_LOADER = 0.50, 0.60, 1.15, 0.95, 1.5


def _run(name: str, cmd: list[str], out: Path, timeout: int, env: dict | None = None) -> tuple[int, str]:
    """Run one step, tee its output to out/name.log; (returncode, output). 124 on timeout."""
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                             timeout=timeout)
        rc, text = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += f"\n{name}: timed out after {timeout} s"
    (out / f"{name}.log").write_text(text)
    tail = "\n".join(text.rstrip().splitlines()[-25:])
    print(tail, f"\n=== {name}: exit {rc} in {time.time() - t0:.0f} s", flush=True)
    return rc, text


def _bench(name: str, file: str, out: Path, timeout: int, *pytest_args: str, env: dict | None = None):
    path = out / f"{name}.json"
    rc, _ = _run(name, [sys.executable, "-m", "pytest", f"bench/{file}", "--benchmark-only", "-q", "-p",
                        "no:cacheprovider", f"--benchmark-json={path}", *pytest_args], out, timeout, env)
    data = json.loads(path.read_text())["benchmarks"] if path.exists() else []
    return rc, [dict(b.get("params") or {}, name=b["name"], **b["extra_info"]) for b in data]


def _find(rows: list[dict], **params) -> dict | None:
    """The benchmark row whose parameters include ``params`` (test name as ``name``)."""
    return next((r for r in rows if all(r.get(k) == v for k, v in params.items())), None)


def _median_seconds(fn, reps: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step_figures(batch: int = 64, size: int = 224) -> dict[str, float]:
    """Seconds per step: baseline (B clean), bank (2B, no UNet), online (augment B + 2B), unet (B alone)."""
    import torchvision

    import diffaug_fast as df

    dev = torch.device("cuda")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    model = torchvision.models.resnet50().to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    den = df.Denoiser(df.UNet(df.get_preset("adm256-uncond")).to(dev), dtype=torch.float16, channels_last=True,
                      eps_only=True)
    aug = df.DiffAug(den, seed=0, mean=mean, std=std)
    g = torch.Generator(dev).manual_seed(0)
    m, s = torch.tensor(mean, device=dev).view(1, 3, 1, 1), torch.tensor(std, device=dev).view(1, 3, 1, 1)
    views = [((torch.rand(batch, 3, size, size, generator=g, device=dev) - m) / s)
             .contiguous(memory_format=torch.channels_last) for _ in range(2)]
    y = torch.randint(0, 1000, (batch,), generator=g, device=dev)
    buf = torch.empty(2 * batch, 3, size, size, device=dev, memory_format=torch.channels_last)
    y2 = torch.cat([y, y])

    def classify(x, labels):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def online():
        buf[:batch].copy_(views[0])
        aug(views[1], out=buf[batch:])
        classify(buf, y2)

    def bank():
        buf[:batch].copy_(views[0])
        buf[batch:].copy_(views[1])  # the decoded stored view
        classify(buf, y2)

    x_t = torch.randn(batch, 3, size, size, device=dev)
    t = torch.full((batch,), 500, device=dev)
    with torch.no_grad():
        unet = _median_seconds(lambda: den(x_t, t))
    return dict(baseline=_median_seconds(lambda: classify(views[0], y)), bank=_median_seconds(bank),
                online=_median_seconds(online), unet=unet, batch=batch)


def _line(name: str, value: str, goal: str, met: bool | None) -> str:
    mark = {True: "met", False: "NOT met", None: "n/a"}[met]
    return f"  {name:44s} {value:34s} goal {goal:22s} {mark}"


def summary(kern: list, unet: list, loader: list, train: dict | None, tests: str, device: str) -> list[str]:
    """The summary block's lines from the benchmark rows (see _bench) and the train-step seconds."""
    lines = [f"gpu-check on {device} (torch {torch.__version__}), {time.strftime('%Y-%m-%d %H:%M')}",
             f"  tests -m gpu: {tests}"]
    for key, label in (("ours-fp16-fast", "UNet adm256 fp16, batch 64 at 224 (eager)"),
                       ("ours-bf16-fast", "UNet adm256 bf16, batch 64 at 224 (eager)")):
        r = _find(unet, preset="adm256-uncond", case=key)
        ref = _find(unet, preset="adm256-uncond", case=f"ref-{key[5:9]}")
        if r is None:
            lines.append(_line(label, "not measured", f">= {GOAL_PEAK:.0%} of peak", None))
            continue
        vs = f", ref {ref['img_per_s']:.0f} img/s" if ref else ""
        lines.append(_line(label, f"{r['img_per_s']:.0f} img/s, {r['peak_fraction']:.0%} of peak{vs}",
                           f">= {GOAL_PEAK:.0%} of {key[5:9]} peak", r["peak_fraction"] >= GOAL_PEAK))
    for case in ("pre_philox", "pre_u8_nhwc", "post_norm_slice"):
        got = [r for r in kern if r.get("case") == case and r.get("backend") != "reference"]
        if not got:
            lines.append(_line(f"fused {case}", "not measured", f">= {GOAL_COPY:.0%} of copy", None))
            continue
        best = max(got, key=lambda r: r["fraction_of_copy"])
        lines.append(_line(f"fused {case} (best: {best['backend']})",
                           f"{best['fraction_of_copy']:.0%} of copy, {best.get('speedup_vs_reference', 0):.1f}x ref",
                           f">= {GOAL_COPY:.0%} of copy", best["fraction_of_copy"] >= GOAL_COPY))
    if train:
        bound = train["unet"] + 2 * train["baseline"]
        ratio = train["online"] / bound
        bank = (2 / train["bank"]) / (1 / train["baseline"])
        lines.append(_line("DiffAug online step / bound (RN50, adm256)", f"{ratio:.3f} ({train['online']:.3f} s vs "
                           f"{bound:.3f} s)", f"<= {GOAL_BOUND}", ratio <= GOAL_BOUND))
        lines.append(_line("bank mode / baseline (classifier img/s)", f"{bank:.2f}x ({2 * train['batch'] / train['bank']:.0f}"
                           f" vs {train['batch'] / train['baseline']:.0f} img/s)", f">= {GOAL_BANK}", bank >= GOAL_BANK))
    else:
        lines.append(_line("DiffAug online step / bound", "not measured", f"<= {GOAL_BOUND}", None))
    ref = _find(loader, name="test_reference_torchvision")
    for key, label in (("dali-mixed", "DALI two-view, mixed (GPU) decode"), ("dali", "DALI two-view, CPU decode")):
        r = _find(loader, backend=key)
        if r is None:
            lines.append(_line(label, "not measured", f">= {GOAL_LOADER}x torchvision", None))
            continue
        ratio = r["img_per_s"] / ref["img_per_s"] if ref else float("nan")
        lines.append(_line(label, f"{r['img_per_s']:.0f} img/s ({ratio:.2f}x torchvision)",
                           f">= {GOAL_LOADER}x torchvision", ratio >= GOAL_LOADER))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--out", default="gpu_check_out")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing run; "
              "`make test` covers the CPU")
        return 0
    out = REPO / a.out
    out.mkdir(parents=True, exist_ok=True)
    failed, tests = [], "skipped (--skip-tests)"
    if not a.skip_tests:
        quick_compile = {"TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS": "ATEN",
                         "TORCHINDUCTOR_MAX_AUTOTUNE_CONV_BACKENDS": "ATEN"}
        rc, text = _run("tests", [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-rsfEP",
                                  "-p", "no:cacheprovider", "--durations=15"], out, 300, quick_compile)
        found = re.findall(r"=+ (.*(?:passed|failed|error|skipped).*) in [\d.]+s", text)
        tests = (found[-1] if found else f"exit {rc}") + "".join(
            f"\n    {m}" for m in re.findall(r"^(DALI mixed vs cpu decoding.*|GPU vs CPU bank build.*)$", text, re.M))
        if rc != 0:
            failed.append("tests")
    kern = unet = loader = []
    train = None
    if not a.skip_bench:
        rc, kern = _bench("bench_kernels", "bench_kernels.py", out, 120)
        failed += ["bench_kernels"] if rc else []
        rc, unet = _bench("bench_unet", "bench_unet.py", out, 240, "-k",
                          "adm256 and (ref-fp32 or ref-fp16 or ours-fp16-fast or ref-bf16 or ours-bf16-fast)")
        failed += ["bench_unet"] if rc else []
        workers = str(min(8, os.cpu_count() or 2))
        rc, loader = _bench("bench_loader", "bench_loader.py", out, 120, "-k", "torchvision or dali",
                            env={"BENCH_LOADER_WORKERS": workers})
        failed += ["bench_loader"] if rc else []
        try:
            train = train_step_figures()
            (out / "train_step.json").write_text(json.dumps(train, indent=1))
        except Exception as e:  # report and go on to the summary: the other figures are still worth printing
            print(f"train step: {type(e).__name__}: {e}")
            failed.append("train_step")
    print("\n" + "=" * 110)
    print("\n".join(summary(kern, unet, loader, train, tests, torch.cuda.get_device_name())))
    if failed:
        print(f"  FAILED steps: {', '.join(failed)} (logs in {out})")
    print("=" * 110)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
