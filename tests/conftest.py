"""Shared fixtures: small generated data, CPU only."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def manifold_data() -> torch.Tensor:
    """300 samples on a 3-dimensional linear manifold in 20 dimensions, plus a little noise."""
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(300, 3))
    mixing = rng.normal(size=(3, 20))
    x = codes @ mixing + 0.05 * rng.normal(size=(300, 20))
    return torch.as_tensor(x, dtype=torch.float32)
