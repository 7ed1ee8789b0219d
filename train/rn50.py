#!/usr/bin/env python
"""ResNet-50 with DiffAug (the recipe and its flags: diffaug_fast/train/recipes/rn50.py); `--help` lists every flag."""

import contextlib
import sys

from diffaug_fast.train.recipes.rn50 import main

if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
