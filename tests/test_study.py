"""The effect study (``python -m diffaug_fast.study``) end to end on a tiny real JPEG dataset: a baseline and a
DiffAug ResNet-18 per seed (1 epoch of 3 steps), a random-weight adm-tiny denoiser, a generated corruption tree
(1 corruption at 2 severities), every method with a 2-step DDA chain. Checked: the files and their rows, top-1
recomputed from the saved per-image predictions, the aggregation against numpy/scipy on the rows read back,
a hand-made result set, resume (one deleted result recomputed identically, nothing retrained; a run cut
short continued with --resume) and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import diffaug_fast as df
from diffaug_fast.data.corruptions import CORRUPTIONS, FAMILIES, VALIDATION_CORRUPTIONS
from diffaug_fast.data.synthetic import make_synthetic_dataset
from diffaug_fast.eval import study, study_data
from diffaug_fast.eval.study_report import format_table, result_rows, summarize

SEEDS, MAX_IMAGES = 2, 6
TRAIN_ARGS = ("--arch resnet18 --epochs 1 --batch-size 8 --lr 0.05 --image-size 32 --resize-size 36 --loader torch "
              "--workers 0")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is faster than contending ones (a ResNet-18
    forward of 4 images at 32 px: ~40 ms on one thread, 90 ms to 1.2 s on two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(dataset root, random adm-tiny checkpoint) shared by the module's studies."""
    tmp = tmp_path_factory.mktemp("study")
    root = make_synthetic_dataset(tmp / "syn", train_per_class=6, val_per_class=2, size=40, severities=(2,))
    shutil.rmtree(root / "val-c")  # every training run would evaluate it at its end: not needed here
    from conftest import randomize_

    torch.manual_seed(0)
    unet = randomize_(df.UNet(df.get_preset("adm-tiny")))  # random but not zero: its views are not plain noise
    torch.save(unet.state_dict(), tmp / "unet.pt")
    return root, tmp / "unet.pt"


def _argv(env, out, *extra) -> list[str]:
    root, unet = env
    return ["--data", str(root), "--unet", str(unet), "--unet-preset", "adm-tiny", "--out", str(out),
            "--seeds", str(SEEDS), "--corruptions", "gaussian_noise", "--severities", "1,2", "--max-images",
            str(MAX_IMAGES), "--de-timesteps", "0,100,300", "--dda-steps", "2", "--eval-batch-size", "4",
            "--no-progress", "--train-args", TRAIN_ARGS, *extra]


@pytest.fixture(scope="module")
def run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "study"
    ret = study.main(_argv(env, out))
    return out, ret


def _csv(out: Path) -> list[dict]:
    with open(out / "study.csv") as f:
        return list(csv.DictReader(f))


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------- files


def test_files_and_rows(run):
    out, ret = run
    for name in ("study.csv", "study.json", "table.md", "study.png", "settings.json"):
        assert (out / name).is_file(), name
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    splits = ["clean", "gaussian_noise-1", "gaussian_noise-2"]
    for k in range(SEEDS):
        for tr in ("baseline", "diffaug"):
            log = (out / "runs" / f"{tr}-seed{k}" / "log.jsonl").read_text()
            assert '"event": "summary"' in log
            settings = json.loads(log.splitlines()[0])
            assert settings["seed"] == k and settings["diffaug"] == ("off" if tr == "baseline" else "online")
            assert settings["de_eval"] is False and settings["arch"] == "resnet18"
        for sp in splits:
            assert (out / "results" / f"seed{k}" / f"{sp}.json").is_file()
            assert (out / "results" / f"seed{k}" / f"{sp}.npz").is_file()
    rows = _csv(out)
    assert len(rows) == 2 * 4 * len(splits) * SEEDS  # training x method x split x seed
    keys = {(r["training"], r["method"], r["corruption"], r["severity"], r["seed"]) for r in rows}
    assert len(keys) == len(rows)
    assert {r["method"] for r in rows} == {"plain", "de", "dda", "dda_se"}
    assert all(r["severity"] == "0" and r["family"] == "clean" for r in rows if r["corruption"] == "clean")
    assert all(r["family"] == "noise" for r in rows if r["corruption"] == "gaussian_noise")
    assert all(int(r["n"]) == MAX_IMAGES for r in rows)
    assert len(json.loads((out / "study.json").read_text())["rows"]) == len(rows) == len(ret["rows"])
    table = (out / "table.md").read_text()
    assert "DiffAug + DiffAug Ensemble" in table and "− baseline + plain" in table and "severity 2" in table


def test_generated_tree_is_the_selected_val_views(run, env):
    out, _ = run
    tree = out / "corrupted" / "gaussian_noise"
    assert sorted(p.name for p in tree.iterdir()) == ["1", "2"]
    files = sorted(p.relative_to(tree / "1") for p in (tree / "1").rglob("*.png"))
    assert len(files) == MAX_IMAGES and files == sorted(p.relative_to(tree / "2") for p in (tree / "2").rglob("*.png"))
    per_class = [sum(1 for f in files if f.parts[0] == c) for c in sorted({f.parts[0] for f in files})]
    assert max(per_class) - min(per_class) <= 1 and len(per_class) == 4  # class-balanced: 2, 2, 1, 1
    from PIL import Image

    with Image.open(tree / "2" / files[0]) as im:
        assert im.size == (32, 32)  # the classifier's centre crop
    # the same images in every split: the clean split's files, by stem
    clean = np.load(out / "results" / "seed0" / "clean.npz")["files"]
    noisy = np.load(out / "results" / "seed0" / "gaussian_noise-2.npz")["files"]
    assert len(clean) == MAX_IMAGES and [Path(f).with_suffix("") for f in clean] == [Path(f).with_suffix("")
                                                                                    for f in noisy]


def test_top1_recomputed_from_predictions(run):
    out, _ = run
    rows = {(r["training"], r["method"], r["corruption"], int(r["severity"]), int(r["seed"])): r for r in _csv(out)}
    for path in sorted((out / "results").rglob("*.json")):
        res = json.loads(path.read_text())
        arrays = np.load(path.with_suffix(".npz"))
        assert len(arrays["label"]) == res["n"] == len(arrays["files"])
        for tr in ("baseline", "diffaug"):
            for m in ("plain", "de", "dda", "dda_se"):
                pred = arrays[f"pred_{tr}_{m}"]
                assert pred.min() >= 0 and pred.max() < 4
                correct = int((pred == arrays["label"]).sum())
                row = rows[(tr, m, res["corruption"], res["severity"], res["seed"])]
                assert int(row["correct"]) == correct
                assert float(row["top1"]) == pytest.approx(100 * correct / res["n"])
        # t = 0 is the unmodified image: the DE's first member is the plain prediction
        for tr in ("baseline", "diffaug"):
            assert res["de_views"][tr]["0"] == pytest.approx(res["top1"][tr]["plain"])


def test_aggregation_against_numpy_and_scipy(run):
    out, _ = run
    rows = _csv(out)
    summary = json.loads((out / "study.json").read_text())["summary"]
    assert summary["severity"] == 2  # no severity 5 in this tree: the highest present
    cells = {(c["training"], c["method"], c["metric"]): c for c in summary["cells"]}

    def per_seed(tr, m, corruption, sev):
        return {int(r["seed"]): float(r["top1"]) for r in rows if r["training"] == tr and r["method"] == m
                and r["corruption"] == corruption and int(r["severity"]) == sev}

    for tr in ("baseline", "diffaug"):
        for m in ("plain", "de", "dda", "dda_se"):
            for metric, (corruption, sev) in {"clean": ("clean", 0), "noise": ("gaussian_noise", 2),
                                              "all15": ("gaussian_noise", 2)}.items():
                v = np.array(list(per_seed(tr, m, corruption, sev).values()))
                c = cells[(tr, m, metric)]
                assert c["mean"] == pytest.approx(v.mean()) and c["std"] == pytest.approx(v.std(ddof=1))
            assert cells[(tr, m, "validation")]["mean"] is None
    diffs = {(d["training"], d["method"], d["metric"]): d for d in summary["differences"]}
    assert summary["differences"][0]["training"] == "diffaug" and summary["differences"][0]["method"] == "de"
    for metric, (corruption, sev) in {"clean": ("clean", 0), "noise": ("gaussian_noise", 2)}.items():
        a, b = per_seed("diffaug", "de", corruption, sev), per_seed("baseline", "plain", corruption, sev)
        d = np.array([a[k] - b[k] for k in sorted(a)])
        got = diffs[("diffaug", "de", metric)]
        assert got["mean"] == pytest.approx(d.mean())
        if d.std(ddof=1) > 0:
            lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(len(d)))
            assert got["ci"] == pytest.approx([lo, hi])
        else:
            assert got["ci"] == pytest.approx([d.mean(), d.mean()])


def test_summary_of_hand_made_results():
    rng = np.random.default_rng(0)
    n = 50
    results = []
    names = [*CORRUPTIONS, *VALIDATION_CORRUPTIONS, "mystery"]
    for seed in range(3):
        for corruption, sev in [("clean", 0)] + [(c, s) for c in names for s in (3, 5)]:
            if seed == 2 and corruption == "fog" and sev == 5:
                continue  # one seed lacks a corruption: it leaves the 15-corruption mean, not the others
            results.append({"seed": seed, "corruption": corruption, "severity": sev, "n": n, "correct": {
                tr: {m: int(rng.integers(0, n + 1)) for m in ("plain", "de")} for tr in ("baseline", "diffaug")}})
    rows = result_rows(results)
    assert len(rows) == sum(4 for _ in results)
    s = summarize(rows)
    assert s["severity"] == 5 and s["counts"] == {"noise": 3, "blur": 4, "weather": 4, "digital": 4, "all15": 15,
                                                  "validation": 4}

    def top1(seed, c, sev, tr, m):
        r = next(r for r in results if r["seed"] == seed and r["corruption"] == c and r["severity"] == sev)
        return 100 * r["correct"][tr][m] / n

    cells = {(c["training"], c["method"], c["metric"]): c for c in s["cells"]}
    groups = {**FAMILIES, "all15": CORRUPTIONS, "validation": VALIDATION_CORRUPTIONS}
    for tr in ("baseline", "diffaug"):
        for m in ("plain", "de"):
            for metric, members in groups.items():
                seeds = [0, 1] if metric in ("all15", "weather") else [0, 1, 2]  # seed 2 lacks fog
                v = [np.mean([top1(k, c, 5, tr, m) for c in members]) for k in seeds]
                assert cells[(tr, m, metric)]["mean"] == pytest.approx(np.mean(v))
                assert cells[(tr, m, metric)]["std"] == pytest.approx(np.std(v, ddof=1))
    d = [top1(k, "clean", 0, "diffaug", "de") - top1(k, "clean", 0, "baseline", "plain") for k in range(3)]
    got = next(x for x in s["differences"] if (x["training"], x["method"], x["metric"]) == ("diffaug", "de", "clean"))
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(d), scale=np.std(d, ddof=1) / math.sqrt(3))
    assert got["mean"] == pytest.approx(np.mean(d)) and got["ci"] == pytest.approx([lo, hi])
    table = format_table(s)
    assert f"{np.mean(d):+.2f} [{lo:+.2f}, {hi:+.2f}]" in table
    assert f"seed 2: {d[2]:+.2f} / " in table
    # one seed: no spread, the interval undefined (said so)
    one = summarize([r for r in rows if r["seed"] == 0])
    assert all(c["std"] is None for c in one["cells"]) and all(x["ci"] is None for x in one["differences"])
    assert "interval undefined: 1 seed" in format_table(one)


# ---------------------------------------------------------------------------------------------------- resume


def test_resume_recomputes_only_what_is_missing(run, env):
    out, _ = run
    runs_before = _mtimes(out / "runs")
    results_before = _mtimes(out / "results")
    victim = out / "results" / "seed1" / "gaussian_noise-1.json"
    old = json.loads(victim.read_text())
    old_preds = dict(np.load(victim.with_suffix(".npz")))
    victim.unlink()
    csv_before = (out / "study.csv").read_text()
    study.main(_argv(env, out))
    assert _mtimes(out / "runs") == runs_before  # nothing retrained, no run folder touched
    after = _mtimes(out / "results")
    changed = {k for k in after if after[k] != results_before.get(k)}
    assert changed == {"seed1/gaussian_noise-1.json", "seed1/gaussian_noise-1.npz"}
    new = json.loads(victim.read_text())
    assert new["correct"] == old["correct"]  # same seeded noise: the same predictions
    new_preds = np.load(victim.with_suffix(".npz"))
    assert all(np.array_equal(new_preds[k], v) for k, v in old_preds.items())
    assert (out / "study.csv").read_text() == csv_before


def test_run_cut_short_is_continued(run, env):
    out, _ = run
    run_dir = out / "runs" / "diffaug-seed1"
    log = run_dir / "log.jsonl"
    lines = [x for x in log.read_text().splitlines() if '"event": "summary"' not in x]
    log.write_text("\n".join(lines) + "\n")  # as if killed during its final report
    ckpt = (run_dir / "last.pt").stat().st_mtime_ns
    results = _mtimes(out / "results")
    study.main(_argv(env, out))
    assert '"event": "summary"' in log.read_text()  # finished by --resume
    assert (run_dir / "last.pt").stat().st_mtime_ns == ckpt  # training was complete: no step, no new checkpoint
    assert _mtimes(out / "results") == results  # the same classifier: its results stand


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("change, match", [
    (lambda a, t: _set(a, "--data", str(t / "nowhere")), "no such folder"),
    (lambda a, t: _set(a, "--seeds", "0"), "--seeds must be >= 1"),
    (lambda a, t: _set(a, "--methods", "plain,tta"), "unknown tta"),
    (lambda a, t: _drop(a, "--unet", "--unet-preset"), "no denoiser"),
    (lambda a, t: [*a, "--train-denoiser"], "not both"),
    (lambda a, t: _set(a, "--unet", str(t / "missing.pt")), "no such file"),
    (lambda a, t: [*a, "--corrupted", str(t / "no-tree")], "--corrupted"),
    (lambda a, t: _set(a, "--corruptions", "gaussian_noise,rain"), "unknown corruption 'rain'"),
    (lambda a, t: _set(a, "--severities", "1,6"), "outside 1-5"),
    (lambda a, t: _set(a, "--train-args", "--epochs 1 --seed 4"), "--seed is set by the study"),
    (lambda a, t: _set(a, "--train-args", "--epochs=1 --diffaug=bank:x"), "--diffaug is set by the study"),
    (lambda a, t: _set(a, "--train-args", "--epochs one"), "not accepted by the rn50 recipe"),
    (lambda a, t: _set(a, "--dda", "start_step=0"), "--dda"),
    (lambda a, t: _set(a, "--de-timesteps", "0,1000"), "t must be < 1000"),
    (lambda a, t: _set(a, "--train-args", TRAIN_ARGS.replace("--image-size 32", "--image-size 30")), "multiple of 4"),
])
def test_bad_input_is_one_line(env, tmp_path, change, match):
    argv = change(_argv(env, tmp_path / "out"), tmp_path)
    with pytest.raises(SystemExit) as e:
        study.main(argv)
    msg = str(e.value.code)
    assert match in msg and "\n" not in msg, msg
    assert not (tmp_path / "out" / "settings.json").exists()  # a corrected rerun is not refused as "other settings"


def test_out_a_file_and_other_settings_refused(env, run, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit, match="not a folder"):
        study.main(_argv(env, tmp_path / "f"))
    (tmp_path / "nodata").mkdir()
    (tmp_path / "nodata" / "train").mkdir()
    with pytest.raises(SystemExit, match="no val/ folder"):
        study.main(_set(_argv(env, tmp_path / "o"), "--data", str(tmp_path / "nodata")))
    out, _ = run
    with pytest.raises(SystemExit, match="other settings .de_timesteps"):
        study.main(_set(_argv(env, out), "--de-timesteps", "0,50"))


# ---------------------------------------------------------------------------------------------------- parts


class _Linear(torch.nn.Module):
    """A classifier whose argmax moves with the input (a random ResNet after 3 steps predicts one class)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, 4)
        torch.nn.init.normal_(self.fc.weight, std=0.05)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_views_are_made_once_and_shared(env, tmp_path):
    """Two copies of one classifier as "baseline" and "diffaug": identical predictions under every method
    (they saw the same DE views and DDA images), the UNet run once per view and batch, not once per classifier,
    and the same seed gives the same result."""
    import copy

    root, unet = env
    s = study.parse_args(_argv(env, tmp_path / "out"))
    torch.manual_seed(0)
    model = _Linear().eval()
    models = {"baseline": model, "diffaug": copy.deepcopy(model)}
    info = {"crop_size": 32, "resize_size": 36, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    dens = [df.load_denoiser(unet, "adm-tiny", eps_only=e) for e in (True, False)]
    calls = [0, 0]
    for i, den in enumerate(dens):
        den.unet.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    classes = ["circles", "squares", "stripes", "triangles"]
    index = study.split_index(root / "val", classes, None)  # 8 images: 2 batches of 4
    parts = study.EvalParts(models, info, classes, dens[0], dens[1], None, torch.device("cpu"))
    split = study.Split("clean", 0, root / "val")
    res, arrays = study.evaluate_split(parts, index, split, 0, s, backend="torch", workers=0)
    assert calls == [2 * 2, 2 * 2]  # DE: t = 100, 300 per batch; DDA: 2 reverse steps per batch
    for m in s.methods:
        assert np.array_equal(arrays[f"pred_baseline_{m}"], arrays[f"pred_diffaug_{m}"]), m
    assert res["correct"]["baseline"] == res["correct"]["diffaug"]
    assert len(set(arrays["pred_baseline_plain"])) > 1  # the classifier does look at its input
    _, arrays2 = study.evaluate_split(parts, index, split, 0, s, backend="torch", workers=0)
    assert all(np.array_equal(arrays[k], arrays2[k]) for k in arrays)


def _tree(root: Path, counts: dict[str, int], ext: str) -> Path:
    from PIL import Image

    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (12, 12), (i * 20, 0, 0)).save(root / cls / f"img{i:02d}{ext}")
    return root


def test_selection_is_balanced_deterministic_and_mirrored(tmp_path):
    counts = {"a": 5, "b": 3, "c": 1, "d": 4}
    val = study_data._list_split(_tree(tmp_path / "val", counts, ".jpg"))
    picked = study.select_files(val, 7)
    assert len(picked) == 7 and picked == study.select_files(val, 7)
    per = {c: sum(1 for k, _ in picked if k == c) for c in counts}
    assert per["c"] == 1 and max(per.values()) - min(v for k, v in per.items() if k != "c") <= 1
    assert study.select_files(val, 100) == [(c, f) for c, fs in val.items() for f in fs]  # all of them
    # a corrupted copy with other extensions: the same images
    copy = study_data._list_split(_tree(tmp_path / "c" / "fog" / "3", counts, ".png"))
    assert [(c, f.stem) for c, f in study.select_files(copy, 7)] == [(c, f.stem) for c, f in picked]
    index = study.split_index(tmp_path / "val", ["a", "b", "c", "d", "e"], 7)
    assert len(index) == 7 and index.classes == ["a", "b", "c", "d", "e"]
    assert [index.classes[y] for y in index.labels] == [c for c, _ in picked]
    with pytest.raises(SystemExit, match="not among the 2 training classes"):
        study.split_index(tmp_path / "val", ["a", "b"], None)
    splits = study.find_splits(tmp_path / "c", None, None)
    assert [(sp.corruption, sp.severity, sp.name) for sp in splits] == [("fog", 3, "fog-3")]
    assert study.find_splits(tmp_path / "c", ["fog"], [1, 2, 3]) == splits
    with pytest.raises(SystemExit, match="snow not in"):
        study.find_splits(tmp_path / "c", ["snow"], None)
    with pytest.raises(SystemExit, match="ImageNet-C layout"):
        study.find_splits(tmp_path / "val", None, None)


def test_trained_denoiser_given_tree_one_seed_and_overwrite(run, env, tmp_path):
    first, _ = run
    out = tmp_path / "study"
    argv = _drop(_argv(env, out), "--unet", "--unet-preset")
    argv = _set(_set(_set(argv, "--seeds", "1"), "--methods", "de"), "--severities", "2")
    argv += ["--train-denoiser", "--denoiser-steps", "2", "--denoiser-args",
             "--batch-size 8 --held-out 4 --eval-every 2", "--corrupted", str(first / "corrupted")]
    ret = study.main(argv)
    den = out / "denoiser" / "model.pt"
    assert den.is_file() and den.with_suffix(".json").is_file()
    settings = json.loads((out / "runs" / "diffaug-seed0" / "log.jsonl").read_text().splitlines()[0])
    assert settings["unet"] == str(den)
    rows = _csv(out)
    assert len(rows) == len(ret["rows"]) == 2 * 2 * 2  # training x {plain, de} x {clean, gaussian_noise-2}
    assert {r["method"] for r in rows} == {"plain", "de"}
    assert "interval undefined: 1 seed" in (out / "table.md").read_text()
    # the given tree holds the clean split's 6 images: the same files are evaluated
    clean = np.load(out / "results" / "seed0" / "clean.npz")["files"]
    noisy = json.loads((out / "results" / "seed0" / "gaussian_noise-2.json").read_text())
    noisy_files = np.load(out / "results" / "seed0" / "gaussian_noise-2.npz")["files"]
    assert [Path(f).with_suffix("") for f in clean] == [Path(f).with_suffix("") for f in noisy_files]
    assert noisy["geometry"] == {"crop_size": 32, "resize_size": 36}  # a given tree: the classifier's geometry
    # other settings: refused, then --overwrite starts afresh (the denoiser, runs and results are remade)
    changed = _set(argv, "--de-timesteps", "0,50")
    with pytest.raises(SystemExit, match="other settings"):
        study.main(changed)
    before = den.stat().st_mtime_ns
    study.main([*changed, "--overwrite"])
    assert den.stat().st_mtime_ns != before
    assert json.loads((out / "settings.json").read_text())["de_timesteps"] == [0, 50]
    assert set(json.loads((out / "results" / "seed0" / "clean.json").read_text())["de_views"]["diffaug"]) == {"0", "50"}


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


def _drop(argv: list[str], *flags: str) -> list[str]:
    argv = list(argv)
    for flag in flags:
        i = argv.index(flag)
        del argv[i:i + 2]
    return argv


def test_demo_defaults_sit_under_the_given_flags(env, tmp_path, monkeypatch):
    """--demo fills every flag not given with the demo's value (data and denoiser made once, cached) and starts
    afresh; a flag given on the command line wins."""
    root, unet = env
    monkeypatch.setattr(study, "make_synthetic_dataset", lambda: root)
    monkeypatch.setattr(study, "demo_unet", lambda data: unet)
    s = study.parse_args(["--demo", "--out", str(tmp_path / "o"), "--seeds", "2", "--unet-preset", "adm-tiny"])
    assert (s.data, s.unet, s.out, s.seeds) == (root.resolve(), unet.resolve(), (tmp_path / "o").resolve(), 2)
    assert not s.overwrite and s.max_images == 60 and s.methods == ("plain", "de") and s.severities == (3, 5)
    assert set(s.corruptions) == set(FAMILIES["noise"] + FAMILIES["blur"] + FAMILIES["digital"])
    assert "--arch resnet18" in " ".join(s.train_args) and "--amp" in s.train_args
    s = study.parse_args(["--demo", "--out", str(tmp_path / "o"), "--max-images", "8", "--methods", "plain",
                          "--unet-preset", "adm-tiny"])
    assert s.max_images == 8 and s.methods == ("plain",) and s.seeds == 1


def _photo_tree(root: Path) -> Path:
    """A class-folder tree of real photographs (scikit-learn's two sample photos, 427 x 640 JPEGs): class
    "china" and class "flower", each image a crop of its photo at its own size and aspect ratio, saved as
    JPEG, PNG with alpha and greyscale JPEG, as a user's own folder would mix them."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for name, img in zip(("china", "flower"), photos.images, strict=True):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(60, 200)), int(rng.integers(60, 260))
                y, x = int(rng.integers(0, 427 - h)), int(rng.integers(0, 640 - w))
                crop = Image.fromarray(img[y:y + h, x:x + w])
                if i % 4 == 1:
                    crop.convert("RGBA").save(d / f"{name}_{split}_{i}.png")
                elif i % 4 == 2:
                    crop.convert("L").save(d / f"{name}_{split}_{i}.jpg", quality=90)
                else:
                    crop.save(d / f"{name}_{split}_{i}.JPEG", quality=90)
    return root


def test_runs_on_a_folder_of_real_photos(env, tmp_path):
    """The study on a user's own class folders of photographs (mixed sizes, formats and colour modes): the
    corruption tree is made from those photos' evaluation views, every (training, method, split) row is written
    over all 8 val photos, and the per-image predictions give the reported top-1."""
    _, unet = env
    root = _photo_tree(tmp_path / "photos")
    out = tmp_path / "study"
    ret = study.main(["--data", str(root), "--unet", str(unet), "--unet-preset", "adm-tiny", "--out", str(out),
                      "--seeds", "1", "--corruptions", "gaussian_noise,contrast", "--severities", "5",
                      "--methods", "plain,de", "--de-timesteps", "0,100", "--eval-batch-size", "4", "--no-progress",
                      "--train-args", TRAIN_ARGS])
    rows = _csv(out)
    assert {r["corruption"] for r in rows} == {"clean", "gaussian_noise", "contrast"}
    assert len(rows) == 2 * 2 * 3 and all(int(r["n"]) == 8 for r in rows)
    assert len(ret["rows"]) == len(rows)
    made = sorted(p.relative_to(out / "corrupted" / "contrast" / "5") for p in (out / "corrupted" / "contrast" / "5")
                  .rglob("*") if p.is_file())
    assert len(made) == 8 and {p.parts[0] for p in made} == {"china", "flower"}
    with np.load(out / "results" / "seed0" / "contrast-5.npz") as z:
        for r in rows:
            if r["corruption"] == "contrast":
                pred = z[f"pred_{r['training']}_{r['method']}"]
                assert float(r["top1"]) == pytest.approx(100.0 * float(np.mean(pred == z["label"])))


def test_demo_reruns_continue_and_restart_only_a_demo_of_other_settings(env, tmp_path, monkeypatch):
    """--demo in an OUT holding a demo with the same settings continues it (finished work reused); a demo with
    other settings is started afresh; a study of other data there is never deleted (prepare_out refuses it)."""
    root, unet = env
    monkeypatch.setattr(study, "make_synthetic_dataset", lambda: root)
    monkeypatch.setattr(study, "demo_unet", lambda data: unet)
    out = tmp_path / "o"
    argv = ["--demo", "--out", str(out), "--unet-preset", "adm-tiny"]
    s = study.parse_args(argv)
    out.mkdir()
    (out / study.SETTINGS_FILE).write_text(json.dumps(s.identity()))
    assert not study.parse_args(argv).overwrite
    assert study.parse_args([*argv, "--overwrite"]).overwrite
    (out / study.SETTINGS_FILE).write_text(json.dumps(s.identity() | {"max_images": 7}))
    assert study.parse_args(argv).overwrite
    (out / study.SETTINGS_FILE).write_text(json.dumps(s.identity() | {"data": "/somewhere/else"}))
    s = study.parse_args(argv)
    assert not s.overwrite
    with pytest.raises(SystemExit, match="holds a study with other settings"):
        study.prepare_out(s)
