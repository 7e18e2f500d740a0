"""Shared test settings: one thread per worker (2-core machine), float64 helpers."""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("POINCARE_TEST_THREADS", "1")))

try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
    settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass

DTYPES = [torch.float32, torch.float64]
CURVATURES = [0.1, 1.0, 2.5]


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param


@pytest.fixture(params=CURVATURES, ids=lambda c: f"c{c}")
def curvature(request):
    return request.param
