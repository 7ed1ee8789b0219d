"""The certification folder: one TSV per sigma (Cohen et al.'s columns), appended one fsynced record at a
time, and settings.json, the provenance that decides whether a rerun may extend them.

A record is a whole line or nothing: a line without its newline (a kill or a full disk mid-write) is not
read, and the next run cuts it before appending. settings.json lists what the certificates depend on
(``RESULT_KEYS``: checkpoint and UNet sha256, the dataset's file list and sampled content, n0, n, alpha, ...)
and the sigmas whose TSVs the folder holds; anything else is of unknown origin.

Under torchrun each process appends to its own sigma_<s>.rank<k>.tsv (same columns, same record rules), so
no two processes ever write one file; rank 0 merges them into sigma_<s>.tsv in image order at the end
(``merge_ranks``: written to a temporary name, renamed, then the rank files are removed). Until then the
finished images of a sigma are those of sigma_<s>.tsv and every rank file (``read_done``), whatever number of
processes wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ..bank import BankError, content_fingerprint, dataset_fingerprint, file_sha256, source_digests
from ..io import atomic_write_bytes

__all__ = ["HEADER", "RESULT_KEYS", "tsv_path", "rank_tsv_path", "read_tsv", "read_done", "merge_ranks",
           "append_record", "cut_torn_tail", "run_settings", "check_folder", "discard_results"]

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
# what a certificate depends on: a folder's TSVs are only ever extended by runs that agree on all of these
RESULT_KEYS = ("ckpt", "unet", "data", "n0", "n", "alpha", "skip", "max", "seed", "amp", "arch", "crop_size")
FINGERPRINTED = ("ckpt", "unet", "data")  # compared by content (<key>_fingerprint); the message shows the paths


_RANK_SUFFIX = re.compile(r"\.rank\d+\.tsv$")


def tsv_path(out: Path, sigma: float) -> Path:
    return out / f"sigma_{sigma:g}.tsv"


def rank_tsv_path(out: Path, sigma: float, rank: int) -> Path:
    """The file torchrun process ``rank`` appends its certificates of ``sigma`` to (merged by ``merge_ranks``)."""
    return out / f"sigma_{sigma:g}.rank{rank}.tsv"


def _rank_tsvs(out: Path, sigma: float) -> list[Path]:
    return sorted(p for p in out.glob(f"sigma_{sigma:g}.rank*.tsv") if _RANK_SUFFIX.search(p.name))


def _records(path: Path) -> dict[int, tuple[str, dict]]:
    """idx -> (the record's line, its fields) for every whole record of one TSV."""
    rows = {}
    if not path.exists():
        return rows
    for line in path.read_text().split("\n")[1:-1]:  # [-1]: "" after the last newline, or the torn tail
        f = line.split("\t")
        if len(f) != 6:
            continue
        try:
            rows[int(f[0])] = (line, {"label": int(f[1]), "predict": int(f[2]), "radius": float(f[3]),
                                      "correct": int(f[4]), "time": float(f[5])})
        except ValueError:
            continue
    return rows


def read_tsv(path: Path) -> dict[int, dict]:
    """Finished images of one sigma: idx -> row. A last line without its newline (a kill or a full disk
    mid-write) is not a record: the next run cuts it and certifies that image again."""
    return {i: row for i, (_, row) in _records(path).items()}


def read_done(out: Path, sigma: float) -> dict[int, dict]:
    """Finished images of ``sigma`` in ``out``: sigma_<s>.tsv and the rank files of an unmerged torchrun run."""
    rows = read_tsv(tsv_path(out, sigma))
    for p in _rank_tsvs(out, sigma):
        rows.update(read_tsv(p))
    return rows


def merge_ranks(out: Path, sigma: float) -> None:
    """Fold the rank files of ``sigma`` into sigma_<s>.tsv, every record once and in image order. The merged
    file replaces the old one atomically before the rank files are removed, so a kill at any point loses
    nothing: a record in both is read once (``read_done``) and the next merge finishes the job."""
    ranks = _rank_tsvs(out, sigma)
    if not ranks:
        return
    lines = {i: line for i, (line, _) in _records(tsv_path(out, sigma)).items()}
    for p in ranks:
        lines.update({i: line for i, (line, _) in _records(p).items()})
    atomic_write_bytes((HEADER + "".join(lines[i] + "\n" for i in sorted(lines))).encode(), tsv_path(out, sigma))
    for p in ranks:
        p.unlink()


def append_record(fd: int, text: str) -> None:
    """Append ``text`` to the open TSV and fsync it: once this returns, the record survives a kill or a
    power loss. Unbuffered os.write, so a failed write leaves nothing pending for close() to retry."""
    data = text.encode()
    while data:
        data = data[os.write(fd, data):]
    os.fsync(fd)


def cut_torn_tail(path: Path) -> None:
    """Truncate ``path`` after its last newline: what follows is a record a kill or a full disk interrupted."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())


def run_settings(a, index, info: dict, amp: torch.dtype | None) -> dict:
    """Everything the certificates depend on (RESULT_KEYS), with content fingerprints: the checkpoints' sha256,
    the dataset's (relative path, label) list and each image's size + sampled bytes (bank.source_digests)."""
    try:
        digests = source_digests(index.files)
    except BankError as e:
        raise SystemExit(f"--data {a.data}: {e}") from None
    data_fp = hashlib.sha256((dataset_fingerprint(index, index.root) + content_fingerprint(digests)).encode())
    return {"ckpt": str(a.ckpt), "ckpt_fingerprint": file_sha256(a.ckpt),
            "unet": a.unet, "unet_fingerprint": file_sha256(a.unet) if a.unet and Path(a.unet).is_file() else a.unet,
            "data": str(a.data), "data_fingerprint": data_fp.hexdigest(),
            "n0": a.n0, "n": a.n, "alpha": a.alpha, "skip": a.skip, "max": a.max, "seed": a.seed,
            "amp": str(amp).replace("torch.", "") if amp else None, "arch": info["arch"],
            "crop_size": info["crop_size"]}


def _differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) of each RESULT_KEY whose value (or content, for FINGERPRINTED keys) differs."""
    diff = []
    for k in RESULT_KEYS:
        if k in FINGERPRINTED:
            if old.get(f"{k}_fingerprint") != new.get(f"{k}_fingerprint"):
                same = old.get(k) == new.get(k)
                diff.append((k, old.get(k), f"{new.get(k)} (same path, other content)" if same else new.get(k)))
        elif old.get(k) != new.get(k):
            diff.append((k, old.get(k), new.get(k)))
    return diff


def check_folder(out: Path, settings: dict, overwrite: bool) -> dict:
    """Refuse (one line) to extend certificates made with other settings, or TSVs that settings.json does not
    list (unknown origin: copied in, hand-written, left by another tool), unless --overwrite. Writes nothing.
    Returns the recorded settings ({} for a new folder, or when --overwrite will discard the old results)."""
    path = out / "settings.json"
    tsvs = sorted(out.glob("sigma_*.tsv"))
    old: dict = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            if not overwrite:
                raise SystemExit(f"{path} is not readable JSON: pass --overwrite to discard {out}'s certificates, "
                                 "or another --out") from None
            return {}
    diff = _differences(old, settings) if old else []
    if diff and not overwrite:
        keys, was, now = zip(*diff, strict=True)
        raise SystemExit(f"{out} holds certificates made with other settings ({', '.join(keys)}: {list(was)} -> "
                         f"{list(now)}); pass --overwrite to discard them, or another --out")
    listed = {tsv_path(out, s).name for s in old.get("sigmas", [])}
    unknown = [p for p in tsvs if _RANK_SUFFIX.sub(".tsv", p.name) not in listed]
    foreign = [p for p in tsvs if p not in unknown and not _starts_with_header(p)]
    if (unknown or foreign) and not overwrite:
        bad = (unknown or foreign)[0]
        why = "not listed in its settings.json" if unknown else "not a certification TSV (no header line)"
        raise SystemExit(f"{bad} is {why}: certificates of unknown origin; pass --overwrite to discard them, or "
                         "another --out")
    return {} if (diff or unknown or foreign) else old


def _starts_with_header(path: Path) -> bool:
    """True when the first line is HEADER, or a part of it (a file created, then killed mid-header)."""
    with open(path, "rb") as f:
        head = f.read(len(HEADER))
    return HEADER.encode().startswith(head)


def discard_results(out: Path) -> None:
    """--overwrite: remove the TSVs and table files of earlier runs (nothing else in the folder)."""
    for p in [*out.glob("sigma_*.tsv"), *out.glob("certified_accuracy.*"), out / "settings.json"]:
        p.unlink(missing_ok=True)
