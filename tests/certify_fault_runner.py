"""Run train/certify.py with a fault installed: ``python tests/certify_fault_runner.py POINT ARGS...``.

POINT is "none" or where this process SIGKILLs itself, counting from its own start:
"mid:K" (the K-th TSV record of this run half written and fsynced: a torn line), "after:K" (the K-th record
fsynced, before the next image: between images), "mc:K" (inside the K-th certificate of this run, after its
n0 selection samples, before the n estimation samples). The faults are installed by replacing
``append_record`` and ``Smooth`` in ``diffaug_fast.eval.certify``; nothing in the package reads them.
"""

from __future__ import annotations

import os
import signal
import sys

from diffaug_fast.eval import certify


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    point, argv = sys.argv[1], sys.argv[2:]
    kind, _, k = point.partition(":")
    k = int(k or 0)
    seen = {"records": 0, "certificates": 0}
    real_append = certify.append_record

    def append_record(fd: int, text: str) -> None:
        if text == certify.HEADER:
            return real_append(fd, text)
        seen["records"] += 1
        if kind == "mid" and seen["records"] == k:
            data = text.encode()
            os.write(fd, data[: len(data) // 2])
            os.fsync(fd)
            _kill()
        real_append(fd, text)
        if kind == "after" and seen["records"] == k:
            _kill()

    class KillingSmooth(certify.Smooth):
        def certify(self, x, n0, n, alpha, batch_size):
            seen["certificates"] += 1
            if kind == "mc" and seen["certificates"] == k:
                self._sample_counts(x, n0, batch_size)
                _kill()
            return super().certify(x, n0, n, alpha, batch_size)

    if kind != "none":
        certify.append_record = append_record
        certify.Smooth = KillingSmooth
    certify.main(argv)


if __name__ == "__main__":
    main()
