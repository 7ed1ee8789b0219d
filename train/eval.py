#!/usr/bin/env python
"""Evaluate a classifier checkpoint: top-1, ImageNet-C, OOD, each plain and with DiffAug Ensemble (diffaug_fast/eval/evaluate.py); `--help` lists every flag."""

import contextlib
import sys

from diffaug_fast.eval.evaluate import main

if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
