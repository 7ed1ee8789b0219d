"""Old import paths, kept for one release: ``import diffaug_fast.training`` still works and warns.

The package was flat up to 0.1.0; its modules now live in folders named after the architecture (ops/,
diffusion/, data/, train/, eval/, bank/). A meta-path finder maps each old dotted name to the module's new
home, so code written against 0.1.0 keeps running and is told, once per module, where to import from.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

# old module -> new module (removed in 0.3.0)
MOVED = {
    "diffaug_fast.augment": "diffaug_fast.ops.augment",
    "diffaug_fast.module": "diffaug_fast.ops.module",
    "diffaug_fast.schedule": "diffaug_fast.diffusion.schedule",
    "diffaug_fast.unet": "diffaug_fast.diffusion.unet",
    "diffaug_fast.denoiser": "diffaug_fast.diffusion.denoiser",
    "diffaug_fast.diffusion_loss": "diffaug_fast.diffusion.loss",
    "diffaug_fast.synthetic": "diffaug_fast.data.synthetic",
    "diffaug_fast.training": "diffaug_fast.train.engine",
    "diffaug_fast.training_report": "diffaug_fast.train.report",
    "diffaug_fast.denoiser_training": "diffaug_fast.train.denoiser_parts",
    "diffaug_fast.vit_recipe": "diffaug_fast.train.recipes.vit_parts",
    "diffaug_fast.ensemble": "diffaug_fast.eval.ensemble",
    "diffaug_fast.ood": "diffaug_fast.eval.ood",
    "diffaug_fast.smoothing": "diffaug_fast.eval.smoothing",
    "diffaug_fast.models": "diffaug_fast.eval.models",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:  # the target module is already executed
        pass


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old name goes away in diffaug-fast 0.3",
                      DeprecationWarning, stacklevel=3)
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
