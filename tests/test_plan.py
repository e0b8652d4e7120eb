import dataclasses

import pytest

from ohq_lightning.plan import (
    CostTable,
    LayerCost,
    LayerInfo,
    Option,
    PlanRow,
    QuantPlan,
    SensitivityTable,
    parse_options,
)


def test_option_parse_names_bits_and_floats():
    assert Option.parse("w4a8") == Option(name="w4a8", weight_bits=4, act_bits=8)
    assert Option.parse("W8").act_bits is None
    assert Option.parse("bf16").is_float and Option.parse("bf16").weight_storage_bits == 16
    assert Option.parse("w2a8").act_storage_bits == 8
    assert Option.parse("w4").act_storage_bits == 32


@pytest.mark.parametrize("name", ["w1a8", "w9a8", "w8a1", "w8a9", "int8", "", "fp64"])
def test_option_parse_rejects_unsupported(name):
    with pytest.raises(ValueError, match=r"bits|unknown option"):
        Option.parse(name)


def test_parse_options_rejects_duplicates_and_empty():
    with pytest.raises(ValueError, match="twice"):
        parse_options(["w8a8", "W8A8"])
    with pytest.raises(ValueError, match="at least one"):
        parse_options([])


def test_layer_info_size_and_bops():
    layer = LayerInfo("c", "Conv2d", "conv", [1, 3, 8, 8], [1, 4, 8, 8], [4, 3, 3, 3], 108, 0, macs=6912)
    assert layer.weight_bytes(Option.parse("w4a8")) == 54
    assert layer.weight_bytes(Option.parse("fp32")) == 432
    assert layer.bops(Option.parse("w4a8")) == 6912 * 32


def test_tables_and_plan_round_trip_through_json(tmp_path):
    layer = LayerInfo("c", "Conv2d", "conv", [1, 3, 8, 8], [1, 4, 8, 8], [4, 3, 3, 3], 108, 4, macs=6912)
    assert LayerInfo.from_json(layer.to_json()) == layer
    costs = CostTable(
        target="analytical",
        options=["w8a8", "w4a8"],
        costs={"c": {"w8a8": LayerCost(108.0, 1.0, 0.1, 0.2), "w4a8": LayerCost(54.0, 0.5, None, None, "table")}},
        int8_weight_bytes={"c": 108.0},
        meta={"note": "x"},
    )
    again = CostTable.from_json(costs.to_json())
    assert again == costs and isinstance(again.costs["c"]["w4a8"], LayerCost)
    scores = SensitivityTable("mqe-quantize", {"c": {"w8a8": 0.0, "w4a8": 0.5}}, {"seed": 0})
    assert SensitivityTable.from_json(scores.to_json()) == scores
    plan = QuantPlan(
        {"c": "w4a8"}, {"size_ratio": 0.5}, {"compression_ratio": 0.5}, layers=[{"name": "c", "option": "w4a8"}]
    )
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert QuantPlan.from_json(path) == plan
    assert QuantPlan.from_json(str(path)) == plan
    assert plan.option_counts() == {"w4a8": 1}


def test_unsupported_entries_are_known_by_their_source_and_skipped_on_request():
    from ohq_lightning.plan import UNSUPPORTED

    costs = CostTable(
        target="cuda",
        options=["fp32", "w8a8"],
        costs={
            "conv": {"fp32": LayerCost(32.0, 1.0, 0.2), "w8a8": LayerCost(8.0, 1.0, 0.1, source="measured")},
            "dw": {"fp32": LayerCost(32.0, 1.0, 0.3), "w8a8": LayerCost(8.0, 1.0, None, None, UNSUPPORTED)},
        },
        int8_weight_bytes={"conv": 8.0, "dw": 8.0},
        meta={"unsupported": {"dw": {"w8a8": "cuDNN int8 conv is limited to groups=1"}}},
    )
    assert costs.costs["conv"]["w8a8"].supported and not costs.costs["dw"]["w8a8"].supported
    assert costs.is_supported("dw", "fp32") and not costs.is_supported("dw", "w8a8")
    assert costs.unsupported_reason("dw", "w8a8") == "cuDNN int8 conv is limited to groups=1"
    assert costs.unsupported_reason("conv", "w8a8") is None
    costs.meta = {}
    assert costs.unsupported_reason("dw", "w8a8") == "marked unsupported by the target"
    # by default an unsupported entry counts as missing the metric (a uniform w8a8 plan has no latency) ...
    assert not costs.has_metric("latency_ms") and not costs.has_metric("latency_ms", ["w8a8"])
    assert costs.has_metric("latency_ms", ["fp32"])
    # ... and a plan that never picks it needs only the supported entries
    assert costs.has_metric("latency_ms", skip_unsupported=True)
    assert not costs.has_metric("energy_mj", skip_unsupported=True)
    again = CostTable.from_json(costs.to_json())
    assert again == costs and not again.costs["dw"]["w8a8"].supported
    assert "supported" not in again.costs["dw"]["w8a8"].to_dict()  # a property, not a stored field


def test_plan_rows_round_trip_in_the_dict_shape_of_old_plans():
    solved = {
        "name": "c",
        "option": "w4a8",
        "sensitivity": 0.5,
        "weight_bytes": 54.0,
        "bops": 0.5,
        "latency_ms": None,
        "energy_mj": None,
        "source": "table",
        "transition_after_ms": 0.0,
    }
    searched = {**solved, "type": "Conv2d", "kind": "conv", "in_shape": [1, 3, 8, 8], "out_shape": [1, 4, 8, 8]}
    searched |= {"macs": 6912, "scores": {"w8a8": 0.0, "w4a8": 0.5}}
    for row in (solved, searched):
        old = {"assignment": {"c": "w4a8"}, "predicted": {"size_ratio": 0.5}, "layers": [row]}
        plan = QuantPlan.from_dict(old)
        assert isinstance(plan.layers[0], PlanRow) and plan.layers[0].option == "w4a8"
        assert plan.to_dict()["layers"] == [row]  # same keys, same order, same values
        assert QuantPlan.from_json(plan.to_json()) == plan
    described = QuantPlan.from_dict({"assignment": {}, "predicted": {}, "layers": [searched]}).layers[0]
    assert described["scores"] == {"w8a8": 0.0, "w4a8": 0.5} and described.get("macs") == 6912
    assert "latency_ms" in described and "nope" not in described
    with pytest.raises(ValueError, match="not a valid QuantPlan"):
        QuantPlan.from_json('{"assignment": {}, "predicted": {}, "layers": [{"name": "c", "option": "w4a8", "x": 1}]}')
    with pytest.raises(dataclasses.FrozenInstanceError):
        described.option = "w8a8"  # type: ignore[misc]
