"""Shared fixtures: small models and paths to the optional real data beside the checkout."""

from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class TinyNet(nn.Module):
    """Conv-BN-ReLU twice, pooling and a classifier: every kind of layer the hooks care about, fast."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "imagenet-sample" / "val").is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA
