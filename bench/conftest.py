"""Benchmark suites append human-readable comparison lines to ``config.bench_report``; they are printed
at the end of the run (pytest-benchmark's table shows each case alone, not the ratios between them)."""

from __future__ import annotations


def pytest_configure(config):
    config.bench_report = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.bench_report:
        terminalreporter.section("diffaug-fast comparisons")
        for line in config.bench_report:
            terminalreporter.write_line(line)
