"""python -m diffaug_fast.train_denoiser: train an ADM denoiser on an ImageFolder tree (``--help`` for the
flags; the trainer is diffaug_fast/train/denoiser.py)."""

from .train.denoiser import main

if __name__ == "__main__":
    main()
