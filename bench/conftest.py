"""Benchmark suites append human-readable comparison lines to ``config.bench_report``; they are printed
at the end of the run (pytest-benchmark's table shows each case alone, not the ratios between them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_test_helpers():
    """tests/conftest.py by path (its randomize_ and friends): `import conftest` here finds this file."""
    path = Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("diffaug_tests_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pytest_configure(config):
    config.bench_report = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.bench_report:
        terminalreporter.section("diffaug-fast comparisons")
        for line in config.bench_report:
            terminalreporter.write_line(line)
