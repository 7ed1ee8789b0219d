#!/usr/bin/env python
"""DeiT-III ViT finetune with DiffAug (the recipe and its flags: diffaug_fast/train/recipes/vit.py); `--help` lists every flag."""

import contextlib
import sys

from diffaug_fast.train.recipes.vit import main

if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
