"""Shared test set-up: one thread (the CI machines have 2 shared cores), fixture helpers."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_github_step_summary(monkeypatch):
    """GitHub Actions sets GITHUB_STEP_SUMMARY; runs under test must not append to it."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


@pytest.fixture(scope="session")
def planted_traces():
    from routeaudit.fixtures.synthetic import make_traces

    return make_traces("planted", 6000, seed=0)


@pytest.fixture(scope="session")
def null_traces():
    from routeaudit.fixtures.synthetic import make_traces

    return make_traces("null", 6000, seed=0)
