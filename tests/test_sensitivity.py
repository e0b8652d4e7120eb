import pytest
import torch
from conftest import same_state, state_snapshot

from ohq_lightning.layers import trace_layers
from ohq_lightning.quant import quantized_layers
from ohq_lightning.sensitivity import kl_divergence, mqe_sensitivity
from ohq_lightning.synthetic import gaussian_inputs

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
        assert row["w4a8"] >= 0.9 * row["w8a8"], name
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
    from ohq_lightning.quant import apply_plan

    model, layers, inputs = scored
    apply_plan(model, {"fc": "w8a8"})
    with pytest.raises(ValueError, match=r"strip_plan\(model\) first"):
        mqe_sensitivity(model, inputs, layers, OPTIONS, progress=False)
    assert sorted(quantized_layers(model)) == ["fc"]


def test_the_temporary_swap_undoes_only_the_layer_it_added(scored):
    from ohq_lightning.plan import Option
    from ohq_lightning.quant import apply_plan
    from ohq_lightning.sensitivity import _logits, _quantize_score

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
