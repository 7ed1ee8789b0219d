"""The DiffAug view bank: pay the UNet once, train at baseline speed.

    python -m diffaug_fast.bank build --data DIR --unet CKPT --views K --out BANK
    torchrun --nproc-per-node N -m diffaug_fast.bank build ...        (images split across ranks)
    python -m diffaug_fast.bank verify BANK

One UNet forward costs ~70 ResNet-50 training steps (docs/method.md), so DiffAug online on every image
cannot run near baseline throughput. The bank stores K DiffAug views of every training image, each the
x0 estimate of the image's Resize(256) + CenterCrop(224) at its own uniformly drawn t with its own noise
seed; the trainer then reads one stored view per image and epoch like an ordinary JPEG.

Layout of BANK:
    plan.json                    the settings the build was started with (a resume must match them), with
                                 what the views depend on: file list, source content fingerprint, checkpoint
                                 sha256, schedule, t range, image and resize size
    sources.npy                  uint64 [N] content digest per source image (size + 3 x 4 KiB samples)
    shards/shard-00000.tar       uncompressed tar, members "<index:08d>.<view>.jpg|png" (webdataset naming)
    shards/shard-00000.json      its index: sha256, bytes, and per member (index, view, t, seed, offset, size, crc32)
    manifest.json                written last: the plan, per-shard sha256 / bytes / index sha256, throughput

Every shard is written to a temporary name, fsynced and renamed, then its index is written the same
way: an interrupted build leaves only complete shards and resumes without redoing them; the next run
removes the temporary files a SIGKILL left. Opening checks every shard's presence and size; every view
read is checked against its crc32 (``BankReader``); ``open_for_training`` refuses a bank whose sources,
geometry, t range, schedule or checkpoint differ from the training run's.

A view is exactly recomputable: ``augment(x, denoiser, t=t, generator=torch.Generator().manual_seed(seed))``
on the image's [1, 3, 224, 224] view, noise drawn on the CPU generator.
"""

from __future__ import annotations

# The modules, base first (each imports only modules above it in this list, so there are no cycles):
# common (errors, format constants, seeds, fingerprints); reader (BankReader, open_for_training), compute
# (UNet options, encoding), shards (the files of a bank being built); build (plan, shards to do, write one
# shard, build_bank) and verify (verify_bank, repair); cli (main, run by __main__).
# Names outside __all__ that callers use are re-exported ("X as X") too.
from .build import build_bank
from .cli import main as main
from .common import BANK_KIND as BANK_KIND
from .common import FORMAT_VERSION as FORMAT_VERSION
from .common import SHARD_IMAGES as SHARD_IMAGES
from .common import (
                     BankError,
                     content_fingerprint,
                     dataset_fingerprint,
                     file_sha256,
                     pick_view,
                     source_digests,
                     view_noise,
                     view_seed,
                     view_t,
)
from .common import source_digest as source_digest
from .compute import unet_gflops as unet_gflops
from .reader import ON_BAD as ON_BAD
from .reader import BankReader, open_for_training
from .shards import bank_bytes_needed, check_out_dir
from .verify import psnr as psnr
from .verify import verify_bank

__all__ = ["view_seed", "view_t", "view_noise", "pick_view", "BankReader", "build_bank", "verify_bank", "BankError",
           "dataset_fingerprint", "file_sha256", "open_for_training", "source_digests", "content_fingerprint",
           "check_out_dir", "bank_bytes_needed"]
