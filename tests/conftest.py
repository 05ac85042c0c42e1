"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_rngs() -> None:
    """Seed Python's, NumPy's and torch's global RNGs so every test starts from the same state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
