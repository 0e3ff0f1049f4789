"""Shared test configuration: skip markers live here, in one place (TRL's testing_utils habit)."""

from __future__ import annotations

import pytest
import torch

import r4t_fast


def _cuda_reason() -> str | None:
    info = r4t_fast.build_info()
    if not info["cuda"]:
        return "this r4t_fast build has no CUDA kernels (built with R4T_CUDA=OFF or without nvcc)"
    if not torch.cuda.is_available():
        return "CUDA build, but torch sees no GPU on this machine"
    if not r4t_fast.cuda_available():
        return "CUDA build, but the CUDA runtime sees no device"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if "cuda" in item.keywords:
            if not checked:
                reason, checked = _cuda_reason(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
