"""Shared fixtures: global RNGs seeded before every test, tiny seeded models, and a per-test cache directory."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv, depthwise conv, grouped conv and a classifier: every kind of layer, tiny and fast."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(8, 16, 1, groups=2), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.dw(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


def make_tiny_net(seed: int = 0) -> TinyNet:
    """A TinyNet with seeded weights and BatchNorm statistics of image-like data (not Gaussian noise)."""
    torch.manual_seed(seed)
    model = TinyNet()
    images = torch.rand(64, 3, 16, 16) * torch.tensor([0.9, 0.6, 0.3])[:, None, None] + 0.2
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the batches below
    with torch.no_grad():
        model.train()
        for batch in images.split(16):
            model(batch)
    return model.eval()


@pytest.fixture
def tiny_net() -> TinyNet:
    return make_tiny_net()


@pytest.fixture
def tiny_input() -> torch.Tensor:
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


TEST_SEED = 0


@pytest.fixture(autouse=True)
def _seeded_rngs() -> None:
    """Every test starts from the same global RNG state (torch, NumPy, Python's ``random``), so an unseeded
    ``torch.rand``/``torch.randn`` in a test draws the same values whichever tests ran before it."""
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)  # also seeds every CUDA device


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test caches synthetic inputs in its own directory."""
    monkeypatch.setenv("OHQ_CACHE_DIR", str(tmp_path / "cache"))


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the model's state, to check that nothing was modified."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    """True when the model's state equals the snapshot exactly (names and values)."""
    state = model.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in state)


def fused_ops(onnx_model, tmp_path) -> list[str]:
    """The op types of ``onnx_model`` after ONNX Runtime's graph optimisation (fusions), in order."""
    import onnx
    import onnxruntime as ort

    from ohq_lightning.deploy import ORT_DISABLED_OPTIMIZERS

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(
        onnx_model.SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS),
    )
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
