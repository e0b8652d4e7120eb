import pytest
import torch
from conftest import same_state, state_snapshot
from torch import nn
from torch.nn.utils import prune

from ohq_lightning.hardware import create_target
from ohq_lightning.layers import trace_layers
from ohq_lightning.pipeline import search
from ohq_lightning.plan import SensitivityTable
from ohq_lightning.quant.fake_quant import WeightFakeQuant
from ohq_lightning.sensitivity import (
    METHODS,
    MQE_METHODS,
    hessian_sensitivity,
    mqe_sensitivity,
    random_sensitivity,
    weight_error_sensitivity,
    weight_quantization_error,
)
from ohq_lightning.solver import solve

OPTIONS = ["w8a8", "w4a8", "w2a8"]


class TwoBranchLinear(nn.Module):
    """``out = A x[:, :3] + B x[:, 3:]``: the squared-error loss is quadratic in A and B."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False)
        self.b = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, :3]) + self.b(x[:, 3:])


def half_squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - target).pow(2).sum(dim=1).mean()


@pytest.fixture
def quadratic():
    torch.manual_seed(0)
    model = TwoBranchLinear()
    scales = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.3, 1.0, 3.0])
    x = torch.randn(40, 7) * scales
    y = torch.randn(40, 2)
    # Hessian of 0.5 * mean ||A x1 + B x2 - y||^2 over A is I_2 (x) mean(x1 x1^T): trace = 2 * mean ||x1||^2
    analytic = {"a": 2 * float(x[:, :3].pow(2).sum(1).mean()), "b": 2 * float(x[:, 3:].pow(2).sum(1).mean())}
    return model, x, y, analytic


def test_methods_name_the_baselines_and_mqe_refuses_them(tiny_net, tiny_input):
    assert set(MQE_METHODS) < set(METHODS) and {"weight_error", "random"} <= set(METHODS)
    with pytest.raises(ValueError, match="MQE method"):
        mqe_sensitivity(tiny_net, torch.randn(4, 3, 16, 16), ["fc"], OPTIONS, method="weight_error", progress=False)


def test_weight_error_grows_as_bits_shrink_and_uses_the_fake_quant_quantizer(tiny_net, tiny_input):
    layers = trace_layers(tiny_net, tiny_input).layers
    before = state_snapshot(tiny_net)
    table = weight_error_sensitivity(tiny_net, layers, [*OPTIONS, "w4", "fp32", "bf16"])
    assert table.method == "weight_error" and table.layers == [layer.name for layer in layers]
    for name, row in table.scores.items():
        assert row["w2a8"] > row["w4a8"] > row["w8a8"] > row["bf16"] > row["fp32"] == 0.0, name
        assert row["w4"] == row["w4a8"]  # activation bits play no part
        weight = tiny_net.get_submodule(name).weight.detach()
        with torch.no_grad():
            expected = float((WeightFakeQuant(weight, 4)(weight) - weight).double().pow(2).sum())
        assert row["w4a8"] == pytest.approx(expected, rel=1e-6)
    assert same_state(tiny_net, before)


def test_weight_error_of_a_pruned_layer_is_that_of_its_masked_weight(tiny_net):
    conv = tiny_net.stem[0]
    prune.l1_unstructured(conv, "weight", amount=0.5)
    masked = (conv.weight_orig * conv.weight_mask).detach()
    table = weight_error_sensitivity(tiny_net, ["stem.0"], ["w2a8"])
    assert table.scores["stem.0"]["w2a8"] == pytest.approx(weight_quantization_error(masked, "w2a8"))


def test_hessian_traces_of_a_quadratic_model_match_the_analytic_trace(quadratic):
    model, x, y, analytic = quadratic
    data = [(x[:25], y[:25]), (x[25:], y[25:])]  # two unequal batches: the Hessian of the mean loss over both
    table = hessian_sensitivity(
        model, data, ["a", "b"], OPTIONS, loss_fn=half_squared_error, iterations=400, trace="raw", progress=False
    )
    assert table.method == "hessian" and table.meta["iterations"] == 400 and table.meta["num_inputs"] == 40
    for name, expected in analytic.items():
        assert table.meta["trace"][name] == pytest.approx(expected, rel=0.1), name
        assert table.meta["trace_stderr"][name] < 0.1 * expected
        per_weight = table.meta["trace"][name] / model.get_submodule(name).weight.numel()
        weight = model.get_submodule(name).weight
        for option in OPTIONS:
            expected_score = per_weight * weight_quantization_error(weight, option)
            assert table.scores[name][option] == pytest.approx(expected_score, rel=1e-9)
    assert not table.meta["negative_trace_layers"]


def test_hessian_is_seeded_and_restores_the_model(quadratic):
    model, x, y, _ = quadratic
    model.train()
    model.b.weight.requires_grad_(False)
    before = state_snapshot(model)
    kwargs = {"loss_fn": half_squared_error, "iterations": 5, "seed": 3, "progress": False}
    first = hessian_sensitivity(model, [(x, y)], ["a", "b"], OPTIONS, **kwargs)
    assert hessian_sensitivity(model, [(x, y)], ["a", "b"], OPTIONS, **kwargs).scores == first.scores
    assert same_state(model, before) and model.training and not model.b.weight.requires_grad
    assert model.a.weight.grad is None


def test_negative_traces_are_handled_by_the_chosen_mode(quadratic):
    model, x, y, analytic = quadratic

    def concave(out, target):  # Hessian = -(the quadratic's): every trace negative
        return -half_squared_error(out, target)

    kwargs = {"loss_fn": concave, "iterations": 200, "progress": False}
    raw = hessian_sensitivity(model, [(x, y)], ["a", "b"], OPTIONS, trace="raw", **kwargs)
    absolute = hessian_sensitivity(model, [(x, y)], ["a", "b"], OPTIONS, trace="abs", **kwargs)
    clamped = hessian_sensitivity(model, [(x, y)], ["a", "b"], OPTIONS, trace="clamp", **kwargs)
    assert raw.meta["negative_trace_layers"] == ["a", "b"]
    assert raw.meta["trace"]["a"] == pytest.approx(-analytic["a"], rel=0.15)
    for name in ("a", "b"):
        for option in OPTIONS:
            assert raw.scores[name][option] < 0
            assert absolute.scores[name][option] == pytest.approx(-raw.scores[name][option])
            assert clamped.scores[name][option] == 0.0
    with pytest.raises(ValueError, match="trace mode"):
        hessian_sensitivity(model, [(x, y)], ["a"], OPTIONS, trace="signed", progress=False)


def test_hessian_runs_through_hardsigmoid_and_puts_it_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Hardsigmoid(), nn.Linear(8, 3))
    gate = model[1]
    data = [(torch.randn(16, 4) * 2, torch.randint(0, 3, (16,)))]
    table = hessian_sensitivity(model, data, ["0", "2"], OPTIONS, iterations=4, progress=False)
    assert table.meta["hardsigmoid_swapped"] == 1 and model[1] is gate
    assert all(score >= 0 for row in table.scores.values() for score in row.values())


def test_random_is_seeded_and_by_default_only_orders_layers(tiny_net, tiny_input):
    names = trace_layers(tiny_net, tiny_input).names()
    options = [*OPTIONS, "fp32"]
    table = random_sensitivity(names, options, seed=5)
    assert table.method == "random" and table.meta["seed"] == 5
    assert random_sensitivity(names, options, seed=5).scores == table.scores
    assert random_sensitivity(names, options, seed=6).scores != table.scores
    for row in table.scores.values():
        assert row["w2a8"] > row["w4a8"] > row["w8a8"] > row["fp32"] == 0.0
    free = random_sensitivity(names, options, seed=5, monotone=False)
    assert all(0 < row[o] < 1 for row in free.scores.values() for o in OPTIONS)


@pytest.fixture
def costs(tiny_net, tiny_input):
    layers = trace_layers(tiny_net, tiny_input).layers
    return layers, create_target("analytical").costs(layers, OPTIONS)


def test_every_baseline_table_plugs_into_the_solver(tiny_net, tiny_input, costs):
    layers, table = costs
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))]
    tables = [
        weight_error_sensitivity(tiny_net, layers, OPTIONS),
        hessian_sensitivity(tiny_net, data, layers, OPTIONS, iterations=3, progress=False),
        random_sensitivity(layers, OPTIONS, seed=1),
    ]
    for scores in tables:
        plan = solve(scores, table, compression_ratio=0.5)
        assert plan.status == "Optimal" and plan.predicted["size_ratio"] <= 0.5 + 1e-9, scores.method
        assert set(plan.assignment) == {layer.name for layer in layers}


def test_search_takes_baselines_by_name_a_precomputed_table_or_a_provider(tiny_net, tiny_input):
    kwargs = {"compression_ratio": 0.5, "options": OPTIONS, "progress": False}
    by_name = search(tiny_net, tiny_input, sensitivity="weight_error", **kwargs)
    assert by_name.meta["sensitivity_method"] == "weight_error" and by_name.meta["synthetic"] is None
    layers = trace_layers(tiny_net, tiny_input).layers
    table = weight_error_sensitivity(tiny_net, layers, OPTIONS)
    given = search(tiny_net, tiny_input, sensitivity=table, **kwargs)
    assert given.assignment == by_name.assignment
    assert search(tiny_net, tiny_input, sensitivity="random", seed=2, **kwargs).meta["sensitivity_method"] == "random"

    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))]
    calls = []

    def provider(model, layers, options):
        calls.append((len(layers), list(options)))
        return hessian_sensitivity(model, data, layers, options, iterations=2, progress=False)

    plan = search(tiny_net, tiny_input, sensitivity=provider, **kwargs)
    assert plan.meta["sensitivity_method"] == "hessian" and calls == [(len(layers), OPTIONS)]


def test_mqe_on_given_images_is_a_provider_as_the_readme_shows(tiny_net, tiny_input):
    kwargs = {"compression_ratio": 0.5, "options": OPTIONS, "progress": False}
    images = torch.rand(4, 3, 16, 16)
    plan = search(
        tiny_net,
        tiny_input,
        sensitivity=lambda m, layers, options: mqe_sensitivity(m, images, layers, options),
        **kwargs,
    )
    direct = mqe_sensitivity(tiny_net, images, trace_layers(tiny_net, tiny_input).layers, OPTIONS)
    assert plan.meta["synthetic"] is None and plan.meta["sensitivity_method"] == direct.method
    assert {row["name"]: row["scores"] for row in plan.layers} == direct.scores


def test_search_refuses_an_incomplete_table_or_a_bad_sensitivity(tiny_net, tiny_input):
    kwargs = {"compression_ratio": 0.5, "options": OPTIONS, "progress": False}
    partial_table = SensitivityTable(method="mine", scores={"fc": dict.fromkeys(OPTIONS, 1.0)})
    with pytest.raises(ValueError, match="no score for"):
        search(tiny_net, tiny_input, sensitivity=partial_table, **kwargs)
    with pytest.raises(ValueError, match="unknown sensitivity method"):
        search(tiny_net, tiny_input, sensitivity="hessian", **kwargs)
    with pytest.raises(ValueError, match="SensitivityTable"):
        search(tiny_net, tiny_input, sensitivity=3, **kwargs)
    with pytest.raises(ValueError, match="not a SensitivityTable"):
        search(tiny_net, tiny_input, sensitivity=lambda m, layers, options: {}, **kwargs)
