import pytest
import torch
from conftest import same_state, state_snapshot
from torch import nn

from ohq_lightning import config
from ohq_lightning.config import SearchConfig
from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import Option, SensitivityTable
from ohq_lightning.quant import apply_plan, quantized_layers
from ohq_lightning.sensitivity import (
    METHODS,
    MQE_METHODS,
    PERTURBATIONS,
    SENSITIVITY_REGISTRY,
    SYNTHETIC_KINDS,
    compute_sensitivity,
    gaussian_inputs,
    kl_divergence,
    mqe_sensitivity,
    random_sensitivity,
    sensitivity_by_name,
    weight_error_sensitivity,
)
from ohq_lightning.sensitivity.mqe import _logits, _quantize_score
from ohq_lightning.sensitivity.synthetic import synthetic_inputs

OPTIONS = ["w8a8", "w4a8", "w2a8", "fp32"]


@pytest.fixture
def scored(tiny_net, tiny_input):
    layers = trace_layers(tiny_net, tiny_input).layers
    inputs = gaussian_inputs(tiny_input, 16)
    return tiny_net, layers, inputs


def test_kl_divergence_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(4, 10)
    assert float(kl_divergence(logits, logits)) == 0.0
    assert float(kl_divergence(logits, logits + torch.randn(4, 10))) > 0


def test_scores_are_ordered_by_bit_width_and_float_is_free(scored):
    model, layers, inputs = scored
    before = state_snapshot(model)
    table = mqe_sensitivity(model, inputs, layers, OPTIONS, progress=False)
    assert table.method == "mqe-quantize" and table.layers == [layer.name for layer in layers]
    for name, row in table.scores.items():
        assert row["fp32"] == 0.0
        assert row["w2a8"] > row["w4a8"] > 0, name
        assert row["w4a8"] > 4 * row["w8a8"], name  # a 16x coarser weight grid; measured: 10x to 365x
    assert same_state(model, before) and not quantized_layers(model)


def test_scores_are_deterministic_for_a_seed(scored):
    model, layers, inputs = scored
    first = mqe_sensitivity(model, inputs, layers, ["w4a8", "w2a8"], progress=False)
    assert mqe_sensitivity(model, inputs, layers, ["w4a8", "w2a8"], progress=False).scores == first.scores
    chunked = mqe_sensitivity(model, inputs, layers, ["w4a8", "w2a8"], batch_size=4, progress=False)
    for name in first.scores:  # chunks calibrate activation ranges per chunk: close, not equal
        for option in first.scores[name]:
            assert chunked.scores[name][option] == pytest.approx(first.scores[name][option], rel=0.3)


def test_activation_bits_matter(scored):
    model, layers, inputs = scored
    table = mqe_sensitivity(model, inputs, layers, ["w8a8", "w8a2", "w8"], progress=False)
    for row in table.scores.values():
        assert row["w8a2"] > row["w8a8"] >= 0
        assert row["w8"] <= row["w8a8"] * 1.5 + 1e-9


def test_random_mask_reading_grows_with_the_masked_fraction(scored):
    model, layers, inputs = scored
    before = state_snapshot(model)
    table = mqe_sensitivity(model, inputs, layers, ["w8a8", "w2a8"], method="random_mask", seed=3, progress=False)
    assert table.method == "mqe-random_mask"
    assert sum(r["w2a8"] for r in table.scores.values()) > sum(r["w8a8"] for r in table.scores.values())
    again = mqe_sensitivity(model, inputs, layers, ["w8a8", "w2a8"], method="random_mask", seed=3, progress=False)
    assert again.scores == table.scores
    assert same_state(model, before)


def test_bad_arguments_are_clear_errors(scored):
    model, layers, inputs = scored
    with pytest.raises(ValueError, match="method"):
        mqe_sensitivity(model, inputs, layers, OPTIONS, method="hessian", progress=False)
    with pytest.raises(ValueError, match="no layers named"):
        mqe_sensitivity(model, inputs, ["missing"], OPTIONS, progress=False)


def test_a_model_with_fake_quant_layers_is_rejected_and_left_as_it_was(scored):
    model, layers, inputs = scored
    apply_plan(model, {"fc": "w8a8"})
    with pytest.raises(ValueError, match=r"strip_plan\(model\) first"):
        mqe_sensitivity(model, inputs, layers, OPTIONS, progress=False)
    assert sorted(quantized_layers(model)) == ["fc"]


def test_the_temporary_swap_undoes_only_the_layer_it_added(scored):
    model, _, inputs = scored
    reference = _logits(model, inputs, len(inputs))
    apply_plan(model, {"fc": "w8a8"})
    score = _quantize_score(
        model, "stem.0", Option.parse("w4a8"), reference, inputs, batch_size=len(inputs), input_quantizer=None
    )
    assert score > 0 and sorted(quantized_layers(model)) == ["fc"]


def test_inputs_must_be_one_batch_tensor(scored):
    model, layers, inputs = scored
    with pytest.raises(ValueError, match="one input tensor"):
        mqe_sensitivity(model, (inputs, inputs), layers, OPTIONS, progress=False)


def _pruned_pair(tiny_net):
    """``tiny_net`` with stem.0 and fc pruned, and a plain copy whose weights are the masked ones."""
    import copy

    from torch.nn.utils import prune

    plain = copy.deepcopy(tiny_net)
    for model in (tiny_net, plain):  # L1 pruning is deterministic: the same masks in both
        prune.l1_unstructured(model.stem[0], "weight", amount=0.5)
        prune.l1_unstructured(model.fc, "weight", amount=0.4)
    for name in ("stem.0", "fc"):
        prune.remove(plain.get_submodule(name), "weight")  # weight = weight_orig * weight_mask, a Parameter
    return tiny_net, plain


@pytest.mark.parametrize("method", ["quantize", "random_mask"])
def test_pruned_layers_are_scored_on_their_masked_weight(tiny_net, tiny_input, method):
    model, plain = _pruned_pair(tiny_net)
    layers = trace_layers(model, tiny_input).layers
    assert [layer.name for layer in layers] == ["stem.0", "dw.0", "grouped.0", "fc"]
    inputs = gaussian_inputs(tiny_input, 16)
    model.stem[0].weight = torch.full_like(model.stem[0].weight, 7.0)  # stale: the forward must not read it
    before = state_snapshot(model)
    stale = {name: model.get_submodule(name).weight for name in ("stem.0", "fc")}
    kwargs = {"method": method, "seed": 5, "progress": False}
    table = mqe_sensitivity(model, inputs, layers, ["w8a8", "w2a8"], **kwargs)
    reference = mqe_sensitivity(plain, inputs, layers, ["w8a8", "w2a8"], **kwargs)
    for name in ("stem.0", "fc"):
        assert table.scores[name]["w2a8"] > 0, name
        for option in ("w8a8", "w2a8"):  # exactly what the same layer scores with its masked weight as a plain one
            assert table.scores[name][option] == pytest.approx(reference.scores[name][option], rel=1e-6, abs=1e-12)
    assert same_state(model, before) and not quantized_layers(model)
    for name, weight in stale.items():  # even the weight attribute the pruning hook rewrites is put back
        assert model.get_submodule(name).weight is weight


def test_the_registry_names_what_the_search_settings_accept():
    assert METHODS == config.SENSITIVITY_METHODS
    assert MQE_METHODS == PERTURBATIONS == ("quantize", "random_mask")
    assert SYNTHETIC_KINDS == config.SYNTHETIC_KINDS
    for kind in config.SYNTHETIC_KINDS:  # every kind a SearchConfig accepts is one the synthetic stage makes
        made = synthetic_inputs(
            nn.Sequential(nn.Conv2d(1, 2, 1)),
            torch.zeros(1, 1, 4, 4),
            kind=kind,
            num_samples=2,
            steps=1,
            cache_dir=False,
            progress=False,
        )
        assert made.shape == (2, 1, 4, 4)
    for name, entry in SENSITIVITY_REGISTRY.items():
        assert entry.name == name and entry.needs_inputs == SearchConfig(sensitivity=name).uses_mqe


def test_a_method_by_name_scores_as_the_function_it_names(scored):
    model, layers, inputs = scored
    for method in ("quantize", "random_mask"):
        by_name = sensitivity_by_name(method, model, layers, OPTIONS, inputs=inputs, seed=3, progress=False)
        direct = mqe_sensitivity(model, inputs, layers, OPTIONS, method=method, seed=3, progress=False)
        assert by_name.method == direct.method and by_name.scores == direct.scores
    by_name = sensitivity_by_name("weight_error", model, layers, OPTIONS, progress=False)
    assert by_name.scores == weight_error_sensitivity(model, layers, OPTIONS).scores
    by_name = sensitivity_by_name("random", model, layers, OPTIONS, seed=3)
    assert by_name.scores == random_sensitivity(layers, OPTIONS, seed=3).scores


def test_a_method_by_name_refuses_an_unknown_name_and_mqe_without_inputs(scored):
    model, layers, _ = scored
    with pytest.raises(ValueError, match=r"unknown sensitivity method 'hessian'; use one of \('quantize'"):
        sensitivity_by_name("hessian", model, layers, OPTIONS)
    with pytest.raises(ValueError, match="scores layers on inputs"):
        sensitivity_by_name("quantize", model, layers, OPTIONS)


def test_the_search_stage_makes_inputs_only_for_mqe_and_times_what_it_ran(scored, tiny_input):
    model, layers, inputs = scored
    timings: dict[str, float] = {}
    settings = SearchConfig(sensitivity="quantize", synthetic="gaussian", num_samples=len(inputs), seed=0)
    table = compute_sensitivity(settings, model, tiny_input, layers, OPTIONS, progress=False, timings=timings)
    assert table.scores == mqe_sensitivity(model, inputs, layers, OPTIONS, progress=False).scores
    assert set(timings) == {"synthetic", "sensitivity"}
    timings.clear()
    table = compute_sensitivity(
        SearchConfig(sensitivity="weight_error"), model, tiny_input, layers, OPTIONS, timings=timings
    )
    assert table.method == "weight_error" and set(timings) == {"sensitivity"}
    partial = SensitivityTable(method="mine", scores={"fc": dict.fromkeys(OPTIONS, 1.0)})
    with pytest.raises(ValueError, match="no score for"):
        compute_sensitivity(SearchConfig(sensitivity=partial), model, tiny_input, layers, OPTIONS)
