"""Shared fixtures. CUDA tests skip with a printed reason on machines without a GPU.

Property and fuzz tests (hypothesis) draw the same examples on every run, so the suite
passes or fails on the code alone; ``HYPOTHESIS_PROFILE=explore`` draws new ones, to hunt
for bugs (run it with a larger ``max_examples`` before a release, and keep what it finds as
a regression test).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("suite", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible on this machine (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # not item.keywords: it holds directory names too
            item.add_marker(skip)
