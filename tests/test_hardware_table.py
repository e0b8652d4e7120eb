"""TableTarget reads costs measured elsewhere; export_cost_table writes any CostTable in that format."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from torch import nn

from ohq_lightning.hardware.analytical import AnalyticalTarget
from ohq_lightning.hardware.base import HardwareTarget
from ohq_lightning.hardware.table import COLUMNS, TableTarget, export_cost_table, model_key
from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import CostTable, LayerInfo, Option

OPTIONS = ("fp32", "w8a8", "w4a8")


@pytest.fixture
def layers() -> list[LayerInfo]:
    """Conv, two depthwise convs with the same signature (they share table rows), and a linear."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )
    found = trace_layers(model, torch.randn(1, 3, 6, 6)).layers
    assert found[1].signature() == found[2].signature()
    return found


@pytest.fixture
def measured(layers) -> CostTable:
    """A cost table with every field filled, transitions (the same for the same signature) and a base latency."""
    table = AnalyticalTarget(options=OPTIONS).costs(layers)
    table.transition_ms = {layer.name: 1e-3 * math.prod(layer.out_shape) / 7 for layer in layers[:-1]}
    table.base_latency_ms = 0.1234567
    return table


def numbers(table: CostTable) -> dict:
    """Every number of a cost table, with the source left out."""
    return {
        "options": table.options,
        "costs": {
            layer: {opt: dataclasses.replace(cost, source="") for opt, cost in row.items()}
            for layer, row in table.costs.items()
        },
        "int8_weight_bytes": table.int8_weight_bytes,
        "transition_ms": table.transition_ms,
        "base_latency_ms": table.base_latency_ms,
    }


def write(path, text: str):
    path.write_text(text)
    return path


# --- round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_exported_table_reads_back_with_identical_numbers(tmp_path, layers, measured, suffix):
    path = export_cost_table(measured, layers, tmp_path / f"costs{suffix}")
    target = TableTarget(path)
    assert isinstance(target, HardwareTarget)
    assert target.options == OPTIONS and target.name == "table"
    again = target.costs(layers)
    assert numbers(again) == numbers(measured)
    assert {cost.source for row in again.costs.values() for cost in row.values()} == {"table"}
    assert again.meta["source"] == "table" and len(again.meta["sha256"]) == 64
    assert os.listdir(tmp_path) == [path.name]


def test_csv_has_one_row_per_signature_and_option(tmp_path, layers, measured):
    path = export_cost_table(measured, layers, tmp_path / "costs.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    signatures = {layer.signature() for layer in layers}
    cost_rows = [line for line in lines[1:] if line.split(",")[1] in OPTIONS]
    assert len(cost_rows) == len(signatures) * len(OPTIONS)  # the two depthwise layers share rows
    assert sum(",transition," in line for line in lines) == len({layer.signature() for layer in layers[:-1]})
    assert sum(",base," in line for line in lines) == 1


def test_json_keeps_target_options_and_meta(tmp_path, layers, measured):
    path = export_cost_table(measured, layers, tmp_path / "costs.json")
    document = json.loads(path.read_text())
    assert document["format"] == "ohq-cost-table" and document["version"] == 1
    assert document["target"] == "analytical" and document["options"] == list(OPTIONS)
    again = TableTarget(path, name="zcu102", options=["w4a8"]).costs(layers)
    assert again.target == "zcu102" and again.options == ["w4a8"]
    assert again.meta["file_target"] == "analytical" and again.meta["file_meta"]["kind"] == "estimated"


def test_empty_size_and_bops_are_computed_from_the_layer(tmp_path, layers):
    fc = layers[-1]
    path = write(tmp_path / "t.csv", f"signature,option,latency_ms,energy_mj\n{fc.signature()},w4a8,0.5,\n")
    cost = TableTarget(path).costs([fc]).costs[fc.name]["w4a8"]
    option = Option.parse("w4a8")
    assert cost.latency_ms == 0.5 and cost.energy_mj is None
    assert cost.weight_bytes == fc.weight_bytes(option) and cost.bops == fc.bops(option)


def test_base_rows_apply_to_their_model_or_to_any_model(tmp_path, layers):
    fc = layers[-1]
    rows = f"{fc.signature()},w8a8,0.5\n{model_key([fc])},base,2.0\n"
    path = write(tmp_path / "t.csv", "signature,option,latency_ms\n" + rows)
    assert TableTarget(path).costs([fc]).base_latency_ms == 2.0
    other = dataclasses.replace(fc, name="other")
    both = TableTarget(path).costs([fc, other])  # a different model: its key does not match
    assert both.base_latency_ms is None and "no base row" in both.meta["base_latency_missing"]
    path = write(tmp_path / "any.csv", "signature,option,latency_ms\n" + rows + "*,base,3.0\n")
    assert TableTarget(path).costs([fc, other]).base_latency_ms == 3.0
    assert TableTarget(path).costs([fc]).base_latency_ms == 2.0  # the exact model's row wins


# --- errors when reading --------------------------------------------------------------------------


def test_missing_entries_are_one_error_listing_every_pair(tmp_path, layers):
    conv = layers[0]
    path = write(
        tmp_path / "t.csv", f"signature,option,latency_ms\n{conv.signature()},w8a8,1\n{conv.signature()},w4a8,1\n"
    )
    target = TableTarget(path)
    with pytest.raises(ValueError) as error:
        target.costs(layers)
    message = str(error.value)
    assert str(path) in message and "4 (signature, option) pair(s)" in message
    for layer in layers[1:]:
        for option in ("w8a8", "w4a8"):
            assert f"{layer.signature()} @ {option}" in message
    assert f"(layers: {layers[1].name}, {layers[2].name})" in message  # same signature: one pair, both names
    assert f"{conv.signature()} @" not in message


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("{sig},w8a8,abc\n", r"row 3: latency_ms must be a number, got 'abc'"),
        ("{sig},w8a8,-0.5\n", r"row 3: latency_ms must not be negative"),
        ("{sig},w8a8,nan\n", r"row 3: latency_ms must be finite"),
        ("{sig},w8a8,\n", r"row 3: latency_ms is required"),
        ("{sig},int4,1\n", r"row 3: unknown option 'int4'"),
        ("{sig},w9a8,1\n", r"row 3: .*between 2 and 8"),
        ("{sig},W4A8,2\n", r"row 3: duplicate entry for \(.*, w4a8\), first given in row 2"),
        (",w8a8,1\n", r"row 3: signature must be a non-empty string"),
        ("{sig},w8a8,1,2\n", r"row 3: more values than the 3 columns"),
        ("{sig},transition,1\nlinear|x,base,1\n", r"row 4: a 'base' row's signature is '\*' or 'model:<hash>'"),
    ],
)
def test_malformed_csv_rows_name_the_file_the_row_and_the_problem(tmp_path, layers, body, problem):
    sig = layers[-1].signature()
    path = write(tmp_path / "bad.csv", f"signature,option,latency_ms\n{sig},w4a8,1\n" + body.format(sig=sig))
    with pytest.raises(ValueError, match=problem) as error:
        TableTarget(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("signature,option,energy_mj", r"row 1 \(header\): missing required column\(s\) \['latency_ms'\]"),
        ("signature,option,latency_ms,latency_us", r"unknown column\(s\) \['latency_us'\]"),
        ("signature,option,latency_ms,option", r"column\(s\) \['option'\] appear more than once"),
        ("", r"row 1: no header row"),
    ],
)
def test_missing_or_unknown_columns_are_errors(tmp_path, header, problem):
    path = write(tmp_path / "bad.csv", header + "\n")
    with pytest.raises(ValueError, match=problem):
        TableTarget(path)


def test_every_bad_row_is_listed_in_one_error(tmp_path, layers):
    sig = layers[-1].signature()
    path = write(
        tmp_path / "bad.csv", f"signature,option,latency_ms,bops\n{sig},w8a8,x,\n{sig},w4a8,1,-3\n{sig},fp8,1,\n"
    )
    with pytest.raises(ValueError) as error:
        TableTarget(path)
    message = str(error.value)
    assert "row 2: latency_ms" in message and "row 3: bops must not be negative" in message
    assert "row 4: unknown option 'fp8'" in message


def test_special_rows_take_latency_only(tmp_path, layers):
    sig = layers[-1].signature()
    path = write(tmp_path / "bad.csv", f"signature,option,latency_ms,bops\n{sig},w8a8,1,\n{sig},transition,1,5\n")
    with pytest.raises(ValueError, match=r"row 3: a 'transition' row has latency_ms only"):
        TableTarget(path)


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (
            {
                "entries": [
                    {"signature": "S", "option": "w8a8", "latency_ms": 1},
                    {"signature": "S", "option": "w4a8", "latency_ms": -1},
                ]
            },
            r"entries\[1\]: latency_ms must not be negative",
        ),
        (
            {"entries": [{"signature": "S", "option": "w8a8", "latency_ms": True}]},
            r"entries\[0\]: latency_ms must be a number",
        ),
        (
            {"entries": [{"signature": "S", "option": "w8a8"}]},
            r"entries\[0\]: missing required key\(s\) \['latency_ms'\]",
        ),
        (
            {"entries": [{"signature": "S", "option": "w8a8", "latency_ms": 1, "cycles": 3}]},
            r"entries\[0\]: unknown key",
        ),
        ({"entries": [{"signature": "S", "option": "w8a8", "latency_ms": 1}], "format": "other"}, r'"format" must be'),
        (
            {"entries": [{"signature": "S", "option": "w8a8", "latency_ms": 1}], "options": ["w2a8"]},
            r"\['w2a8'\], which have no cost rows",
        ),
        ({"entries": []}, r"no cost rows"),
        ({"rows": []}, r'an object with an "entries" list'),
    ],
)
def test_malformed_json_tables_are_errors(tmp_path, document, problem):
    path = write(tmp_path / "bad.json", json.dumps(document))
    with pytest.raises(ValueError, match=problem) as error:
        TableTarget(path)
    assert str(path) in str(error.value)


def test_invalid_json_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"line 1: invalid JSON"):
        TableTarget(write(tmp_path / "bad.json", "{not json"))
    with pytest.raises(ValueError, match="does not exist"):
        TableTarget(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=r"unknown format '\.xlsx'"):
        TableTarget(write(tmp_path / "t.xlsx", ""))


def test_an_option_the_table_does_not_provide_is_a_clear_error(tmp_path, layers, measured):
    path = export_cost_table(measured, layers, tmp_path / "costs.csv")
    with pytest.raises(
        ValueError, match=r"does not provide option\(s\) \['w2a8'\]; it has rows for \['fp32', 'w8a8', 'w4a8'\]"
    ):
        TableTarget(path, options=["w8a8", "w2a8"])
    target = TableTarget(path, options=["w8a8"])
    with pytest.raises(ValueError, match=r"costs\(\): .*does not provide option\(s\) \['w2a8'\]"):
        target.costs(layers, ["w2a8"])
    assert target.costs(layers, ["fp32"]).options == ["fp32"]


# --- errors when writing, and atomicity -----------------------------------------------------------


def test_export_rejects_conflicting_same_signature_costs_unless_asked_to_average(tmp_path, layers, measured):
    first, second = layers[1].name, layers[2].name
    measured.costs[second]["w8a8"].latency_ms = measured.costs[first]["w8a8"].latency_ms + 2.0
    differ = rf"layers \['{first}', '{second}'\] differ \({first}: latency_ms=.*; {second}: latency_ms=[0-9.]+\)"
    with pytest.raises(ValueError, match=rf"(?s)on_conflict='mean'.*{differ}"):
        export_cost_table(measured, layers, tmp_path / "costs.csv")
    assert os.listdir(tmp_path) == []
    path = export_cost_table(measured, layers, tmp_path / "costs.csv", on_conflict="mean")
    read = TableTarget(path).costs(layers).costs
    expected = measured.costs[first]["w8a8"].latency_ms + 1.0
    assert read[first]["w8a8"].latency_ms == pytest.approx(expected) == read[second]["w8a8"].latency_ms


def test_export_needs_every_layer_and_a_latency_for_every_entry(tmp_path, layers, measured):
    with pytest.raises(ValueError, match="no LayerInfo for table layer"):
        export_cost_table(measured, layers[:2], tmp_path / "costs.csv")
    measured.costs[layers[0].name]["w4a8"].latency_ms = None
    with pytest.raises(ValueError, match=rf"needs latency_ms for every entry; missing for {layers[0].name} @ w4a8"):
        export_cost_table(measured, layers, tmp_path / "costs.csv")
    with pytest.raises(ValueError, match=r"use a \.csv or \.json suffix"):
        export_cost_table(measured, layers, tmp_path / "costs.txt")


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_failed_export_leaves_the_old_file_and_no_temporary_file(tmp_path, layers, measured, suffix):
    path = write(tmp_path / f"costs{suffix}", "original\n")
    if suffix == ".csv":  # fails part-way through the rows
        measured.costs[layers[-1].name]["w4a8"].energy_mj = object()
    else:  # fails part-way through the document
        measured.meta["device"] = object()
    with pytest.raises(ValueError, match="export_cost_table"):
        export_cost_table(measured, layers, path)
    assert path.read_text() == "original\n"
    assert os.listdir(tmp_path) == [path.name]


def test_a_failed_replace_leaves_the_old_file_and_no_temporary_file(tmp_path, layers, measured, monkeypatch):
    path = write(tmp_path / "costs.csv", "original\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        export_cost_table(measured, layers, path)
    assert path.read_text() == "original\n" and os.listdir(tmp_path) == [path.name]


def test_export_overwrites_and_creates_folders(tmp_path, layers, measured):
    path = tmp_path / "sub" / "costs.csv"
    export_cost_table(measured, layers, path)
    measured.base_latency_ms = 9.0
    export_cost_table(measured, layers, path)
    assert TableTarget(path).costs(layers).base_latency_ms == 9.0
    assert os.listdir(path.parent) == ["costs.csv"]
