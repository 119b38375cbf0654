"""pytest set-up for the pytest-benchmark cases in this folder.

pyproject's ``addopts`` holds ``--benchmark-disable`` so that ordinary runs execute each
case once, as a smoke test. ``pytest benchmarks --benchmark-only`` is meant to measure,
so it switches benchmarking back on (pytest-benchmark refuses the two flags together).
"""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True
