"""Settings as frozen dataclasses, and their command lines generated from where each default is declared.

    @dataclass(frozen=True)
    class Settings(EngineSettings):
        lr: float = setting(0.1, "peak learning rate")

Every field becomes ``--field-name`` (``--x/--no-x`` for bools) whose ``--help`` shows the help text and the
default; a run's settings are resolved once (``dataclasses.replace``) and never mutated afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

__all__ = ["setting", "build_parser", "given_flags", "parse_settings"]

_KINDS = {"int": int, "float": float}


def setting(default: Any, help: str) -> Any:
    """A dataclass field with its ``--help`` text."""
    return dataclasses.field(default=default, metadata={"help": help})


def build_parser(cls: type, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """One flag per field of ``cls``; nothing given stays None (so presets can sit under the given flags)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{text} (default: {default})" if text else f"(default: {default})"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = _KINDS.get(f.type.split(" ")[0], str)
            p.add_argument(flag, type=kind, default=None, help=text.replace("%", "%%"),
                           metavar=f.name.upper())
    return p


def given_flags(cls: type, argv: list[str] | None, description: str, prog: str | None = None) -> dict:
    """The flags given on the command line for the dataclass ``cls``; flags not given are left out."""
    args = build_parser(cls, description, prog).parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}


def parse_settings(cls: type, argv: list[str] | None, description: str, demo: dict,
                   presets: dict[str, dict] | None = None) -> Any:
    """``cls`` from the command line. Under the given flags: without --data the ``demo`` defaults; with
    ``--recipe NAME`` (a field of ``cls``) ``presets[NAME]``."""
    given = given_flags(cls, argv, description)
    defaults = dict(demo) if given.get("data") is None else {}
    if given.get("recipe") is not None:
        if given["recipe"] not in (presets or {}):
            raise SystemExit(f"--recipe {given['recipe']!r}: unknown; choose one of {', '.join(presets or {})}")
        defaults = presets[given["recipe"]]
    return cls(**{**defaults, **given})
