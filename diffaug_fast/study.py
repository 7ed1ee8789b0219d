"""``python -m diffaug_fast.study``: does DiffAug help on this dataset? (see diffaug_fast/eval/study.py)."""

from .eval.study import main

if __name__ == "__main__":
    main()
