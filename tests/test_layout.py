"""The package's layout: every module imports on its own in a fresh interpreter, in dependency order, with no
import cycle; old import paths still work for one release and warn; the public API keeps its names."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from graphlib import TopologicalSorter
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "diffaug_fast"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _own_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports at module level (relative imports resolved)."""
    name = _module_name(path)
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            if mod.startswith("diffaug_fast"):
                for alias in node.names:  # `from pkg import submodule` depends on the submodule
                    sub = f"{mod}.{alias.name}"
                    found.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                              or (PKG.parent / sub.replace(".", "/")).is_dir() else mod)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("diffaug_fast")}
    return found - {name}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _own_imports(p) for p in PKG.rglob("*.py") if p.name != "__main__.py"}


def test_no_import_cycles_between_modules():
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in _graph().items()}  # a package's
    # __init__ runs before its modules: a module importing its own package's names is not a cycle of files
    order = list(TopologicalSorter(graph).static_order())  # raises CycleError naming the cycle
    assert set(order) >= set(graph)


def test_every_module_imports_alone_in_dependency_order():
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in _graph().items()}
    order = [m for m in TopologicalSorter(graph).static_order() if m in graph]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    skip = {"diffaug_fast.ops.triton_augment"}  # needs triton's runtime (GPU or TRITON_INTERPRET): tested there
    res = subprocess.run([sys.executable, "-c", code, *[m for m in order if m not in skip]], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("old, new", [("diffaug_fast.training", "diffaug_fast.train.engine"),
                                      ("diffaug_fast.ensemble", "diffaug_fast.eval.ensemble"),
                                      ("diffaug_fast.unet", "diffaug_fast.diffusion.unet")])
def test_old_import_paths_warn_and_give_the_new_module(old, new):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_public_api_names():
    import diffaug_fast as df

    for name in ("augment", "DiffAug", "load_denoiser", "Smooth", "Workspace", "available_backends", "UNet"):
        assert hasattr(df, name), name
    assert callable(df.ood.metrics)


@pytest.mark.parametrize("module, cls", [("diffaug_fast.train.recipes.rn50", "Settings"),
                                         ("diffaug_fast.train.recipes.vit", "Settings"),
                                         ("diffaug_fast.train.denoiser", "DenoiserSettings")])
def test_every_flag_has_help_and_its_default_and_settings_are_frozen(module, cls):
    import dataclasses

    from diffaug_fast.train.flags import build_parser

    settings = getattr(importlib.import_module(module), cls)
    parser = build_parser(settings, "")
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    for f in dataclasses.fields(settings):
        text = helps[f.name]
        assert f.metadata.get("help") and f.metadata["help"] in text, f.name
        assert f"(default: {f.default})" in text, f.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings().seed = 1  # resolved once, never mutated
