"""MQE's suffix runner: re-running only what the perturbed layer changes scores exactly what full forwards score."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import same_state, state_snapshot
from torch import nn
from torch.nn.utils import prune

from ohq_lightning.quant import quantized_layers
from ohq_lightning.sensitivity import _suffix as suffix
from ohq_lightning.sensitivity import mqe, mqe_sensitivity

OPTIONS = ["w8a8", "w2a8", "w4", "fp16", "fp32"]
METHODS = ["quantize", "random_mask"]


def _inputs(*shape: int, count: int = 8) -> torch.Tensor:
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(1))


def _both(monkeypatch, model, inputs, names, **kwargs):
    """The table of the suffix path and that of full forwards, checked equal; the model checked unchanged."""
    before = state_snapshot(model)
    kwargs = {"options": OPTIONS, "seed": 3, "progress": False} | kwargs
    fast = mqe_sensitivity(model, inputs, names, **kwargs)
    assert same_state(model, before) and not quantized_layers(model)
    monkeypatch.setattr(mqe, "_SUFFIX_RECOMPUTE", False)
    full = mqe_sensitivity(model, inputs, names, **kwargs)
    monkeypatch.setattr(mqe, "_SUFFIX_RECOMPUTE", True)
    assert full.meta["recompute"] == "full: switched off"
    assert fast.scores.keys() == full.scores.keys()
    for name, row in full.scores.items():
        for option, score in row.items():
            assert fast.scores[name][option] == pytest.approx(score, rel=1e-5, abs=1e-9), (name, option)
    assert sum(s for row in full.scores.values() for s in row.values()) > 0
    return fast, full


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))


class Residual(nn.Module):
    """Skip connections around, before and after the scored convs; an in-place add onto a recorded value."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.c = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = self.act(x + self.b(self.act(self.a(x))))
        out = self.c(x)
        out = out.add_(self.down(x))  # perturbing `down` re-runs this in-place add onto the recorded `c` output
        return self.fc(self.act(out).mean((2, 3)))


class Shared(nn.Module):
    """One layer called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        return self.out(self.shared(torch.tanh(self.shared(x))) + x)


class Squeeze(nn.Module):
    """An SE-style branch ``x * sigmoid(se(mean(x)))`` around the scored convs; a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.se, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 4)
        self.scale = torch.tensor(1.5)  # no buffer: the tracer makes it a constant it attaches to the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))
        return self.fc(self.conv2(x).mean((2, 3)) * self.scale)


class Branchy(nn.Module):
    """Python control flow on a value: cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        if x.sum() > 0:
            x = -x
        return self.second(x)


class RereadAfterInPlace(nn.Module):
    """Reads a value after an in-place op changed it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        b = self.c2(a)
        a.mul_(0.5)
        return self.c3(a + b)


class FunctionalHead(nn.Module):
    """Reads its classifier's weight without calling it: no call_module node for that layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(self.body(x)), self.head.weight, self.head.bias)


class Tied(nn.Module):
    """Reads a scored layer's weight again outside it: a decoder tied to the encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mid = nn.Linear(8, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.mid(torch.tanh(self.enc(x)))), self.enc.weight.t())


class OwnLinear(nn.Linear):
    """An ``nn.Linear`` subclass from outside ``torch.nn``: the standard tracer would trace through it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.0


@pytest.mark.parametrize("method", METHODS)
def test_a_plain_sequential_scores_the_same_on_the_suffix(monkeypatch, method):
    fast, _ = _both(monkeypatch, _plain(), _inputs(8), ["0", "2", "4"], method=method)
    assert fast.meta["recompute"] == "suffix"


@pytest.mark.parametrize("method", METHODS)
def test_skip_connections_and_in_place_ops_score_the_same(monkeypatch, method):
    torch.manual_seed(0)
    fast, _ = _both(monkeypatch, Residual(), _inputs(3, 8, 8), ["stem", "a", "b", "c", "down", "fc"], method=method)
    assert fast.meta["recompute"] == "suffix"


@pytest.mark.parametrize("method", METHODS)
def test_a_layer_called_twice_scores_the_same(monkeypatch, method):
    torch.manual_seed(0)
    fast, _ = _both(monkeypatch, Shared(), _inputs(6), ["inp", "shared", "out"], method=method)
    assert fast.meta["recompute"] == "suffix"


@pytest.mark.parametrize("method", METHODS)
def test_a_squeeze_excite_branch_scores_the_same_and_leaves_no_constant(monkeypatch, method):
    torch.manual_seed(0)
    model = Squeeze()
    fast, _ = _both(monkeypatch, model, _inputs(3, 8, 8), ["conv1", "se", "conv2", "fc"], method=method)
    assert fast.meta["recompute"] == "suffix"
    assert not [key for key in vars(model) if key.startswith("_tensor_constant")]


@pytest.mark.parametrize("method", METHODS)
def test_pruned_layers_and_small_batches_score_the_same(monkeypatch, method):
    torch.manual_seed(0)
    model = Residual()
    prune.l1_unstructured(model.a, "weight", amount=0.5)
    prune.random_unstructured(model.fc, "weight", amount=0.3)
    stale = model.a.weight
    names = ["stem", "a", "b", "c", "down", "fc"]
    fast, _ = _both(monkeypatch, model, _inputs(3, 8, 8, count=7), names, method=method, batch_size=3)
    assert fast.meta["recompute"] == "suffix"
    assert model.a.weight is stale


@pytest.mark.parametrize("method", METHODS)
def test_a_weight_read_outside_its_layer_is_re_read(monkeypatch, method):
    torch.manual_seed(0)
    fast, _ = _both(monkeypatch, Tied(), _inputs(8), ["enc", "mid"], method=method)
    assert fast.meta["recompute"] == "suffix"


def test_a_subclass_of_a_torch_layer_is_kept_whole(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(OwnLinear(8, 8), nn.ReLU(), OwnLinear(8, 4))
    fast, _ = _both(monkeypatch, model, _inputs(8), ["0", "2"], method="random_mask", options=["w8", "w2"])
    assert fast.meta["recompute"] == "suffix"


@pytest.mark.parametrize(
    ("model", "names", "method", "reason"),
    [
        (Branchy, ["first", "second"], "quantize", "full: tracing failed"),
        (RereadAfterInPlace, ["c1", "c2", "c3"], "random_mask", "full: node add reads c1 after an in-place op"),
        (RereadAfterInPlace, ["c1", "c2", "c3"], "quantize", "full: node add reads c1 after an in-place op"),
        (FunctionalHead, ["body", "head"], "random_mask", "full: layer 'head' has no call_module node"),
    ],
)
def test_what_the_suffix_cannot_run_falls_back_to_full_forwards(monkeypatch, model, names, method, reason):
    torch.manual_seed(0)
    options = ["w8a8", "w2a8", "w4"]  # no float option: random_mask would swap in a layer FunctionalHead never calls
    fast, _ = _both(monkeypatch, model(), _inputs(8), names, method=method, options=options)
    assert fast.meta["recompute"].startswith(reason)


def test_over_the_memory_cap_falls_back_to_full_forwards(monkeypatch):
    monkeypatch.setattr(suffix, "MEMORY_CAP_BYTES", 0)
    fast, _ = _both(monkeypatch, _plain(), _inputs(8), ["0", "2", "4"])
    assert fast.meta["recompute"].startswith("full: recorded values would take")
    assert suffix.memory_cap(torch.device("cpu")) == 0


def test_the_runner_keeps_only_what_a_re_run_reads_and_frees_it():
    torch.manual_seed(0)
    model = _plain().eval()
    inputs = _inputs(8)
    with torch.no_grad():
        reference = model(inputs)
        runner, how = suffix.suffix_runner(model, ["0", "2", "4"], inputs.split(3), reference)
        assert how == "suffix" and runner is not None
        assert sorted(node.name for node in runner.keep) == ["_1", "_3", "input_1", "output"]  # each layer's input
        assert [node.name for node in runner.dirty["4"]] == ["_4", "output"]
        assert torch.equal(runner.logits("2"), reference)
        assert runner.nbytes == (16 + 16 + 4) * 4 * 8  # two layers' 16-wide inputs and the output, float32, 8 samples
    runner.close()
    assert runner.envs == []


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_resnet18_scores_the_same_on_the_suffix(monkeypatch, method):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    names = ["conv1", "layer1.0.conv1", "layer2.0.downsample.0", "layer3.1.conv2", "layer4.0.conv1", "fc"]
    fast, _ = _both(monkeypatch, model, _inputs(3, 32, 32, count=4), names, method=method, options=["w4a8", "w2"])
    assert fast.meta["recompute"] == "suffix"
