#!/usr/bin/env python
"""Certified accuracy by (diffusion denoised) randomized smoothing (diffaug_fast/eval/certify.py); `--help` lists every flag."""

import contextlib
import sys

from diffaug_fast.eval.certify import main

if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
