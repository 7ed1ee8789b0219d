"""``python -m diffaug_fast.bank build|verify ...`` (and ``torchrun ... -m diffaug_fast.bank build``)."""

from .cli import main

main()
