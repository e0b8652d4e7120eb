"""Analytical targets (roofline CPU, bit-serial accelerator), their presets, and the Hydra hardware configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ohq_lightning.hardware.analytical import AnalyticalTarget, BitSerialTarget
from ohq_lightning.hardware.base import HardwareTarget
from ohq_lightning.hardware.presets import ANALYTICAL_PRESETS, analytical_preset
from ohq_lightning.hardware.table import TableTarget, export_cost_table
from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import LayerInfo, Option, parse_options

CONF = Path(__file__).resolve().parents[1] / "conf" / "hardware"

BIG_CONV = LayerInfo(
    "big", "Conv2d", "conv", [1, 64, 56, 56], [1, 64, 56, 56], [64, 64, 3, 3], 36864, 0,
    macs=56 * 56 * 64 * 64 * 9, padding=[1, 1, 1, 1],
)  # fmt: skip
WIDE_FC = LayerInfo("fc", "Linear", "linear", [1, 1024], [1, 1024], [1024, 1024], 1024 * 1024, 1024, macs=1024 * 1024)
TINY_FC = LayerInfo("tiny", "Linear", "linear", [1, 4], [1, 4], [4, 4], 16, 4, macs=16)


@pytest.fixture
def layers() -> list[LayerInfo]:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    return trace_layers(model, torch.randn(1, 3, 8, 8)).layers


# --- AnalyticalTarget, unchanged behaviour --------------------------------------------------------


def test_analytical_target_still_works_and_says_estimated(layers):
    table = AnalyticalTarget().costs(layers)
    assert table.target == "analytical" and table.options == ["w8a8", "w4a8", "w2a8"]
    assert table.meta["source"] == "analytical" and table.meta["kind"] == "estimated"
    assert {c.source for row in table.costs.values() for c in row.values()} == {"analytical"}
    conv = table.costs[layers[0].name]
    assert conv["w4a8"].weight_bytes == conv["w8a8"].weight_bytes / 2
    assert conv["w8a8"].weight_bytes == 216 and conv["w4a8"].weight_bytes == 108  # 8 x 3 x 3 x 3 weights, 1 or 1/2 byte
    assert table.int8_weight_bytes[layers[0].name] == layers[0].weight_numel


# --- BitSerialTarget --------------------------------------------------------------------------


def latency(target: BitSerialTarget, layer: LayerInfo, option: str) -> float:
    return target.cost(layer, Option.parse(option)).latency_ms


def test_bit_serial_latency_scales_with_weight_times_activation_bits_when_compute_bound():
    target = BitSerialTarget()
    for option in ("w8a8", "w4a4", "w2a2"):
        assert target.compute_ms(BIG_CONV, Option.parse(option)) > target.memory_ms(BIG_CONV, Option.parse(option))
    w2a2, w4a4, w8a8 = (latency(target, BIG_CONV, o) for o in ("w2a2", "w4a4", "w8a8"))
    assert w2a2 < w4a4 < w8a8
    overhead = target.layer_overhead_us * 1e-3
    assert (w8a8 - overhead) / (w4a4 - overhead) == pytest.approx(4.0)
    assert (w4a4 - overhead) / (w2a2 - overhead) == pytest.approx(4.0)
    assert latency(target, BIG_CONV, "w4a8") < w8a8  # weight bits alone also count
    # 115,605,504 MACs x 8 x 8 bit-steps / 4,096e9 per s = 1.806336e-3 s = 1.806336 ms, plus 1 us = 0.001 ms overhead
    assert w8a8 == pytest.approx(1.807336)


# Memory time = (weights at w bits + inputs at a bits + outputs at 8 bits) in bytes / 4 GB/s:
#   wide (1024 x 1024 weights, 1024 in, 1024 out)
#     w8a8: 1,048,576 + (1024 x 8 + 1024 x 8) / 8 = 1,048,576 + 2,048 = 1,050,624 B -> / 4e9 = 0.262656 ms
#     w4a4:   524,288 + (1024 x 4 + 1024 x 8) / 8 =   524,288 + 1,536 =   525,824 B -> 0.131456 ms
#     w2a2:   262,144 + (1024 x 2 + 1024 x 8) / 8 =   262,144 + 1,280 =   263,424 B -> 0.065856 ms
#   tiny (4 x 4 weights, 4 in, 4 out)
#     w8a8: 16 + (32 + 32) / 8 = 24 B -> 6e-6 ms;  w4a4: 8 + (16 + 32) / 8 = 14 B -> 3.5e-6 ms;
#     w2a2:  4 + (8 + 32) / 8 = 9 B -> 2.25e-6 ms
MEMORY_MS = {
    "wide": {"w8a8": 0.262656, "w4a4": 0.131456, "w2a2": 0.065856},
    "tiny": {"w8a8": 6e-6, "w4a4": 3.5e-6, "w2a2": 2.25e-6},
}


@pytest.mark.parametrize(("layer", "memory_ms"), [(WIDE_FC, MEMORY_MS["wide"]), (TINY_FC, MEMORY_MS["tiny"])],
                         ids=["wide-linear", "tiny-linear"])  # fmt: skip
def test_bit_serial_latency_is_bounded_below_by_memory_time(layer, memory_ms):
    target = BitSerialTarget()
    for name in ("w8a8", "w4a4", "w2a2"):
        option = Option.parse(name)
        assert target.compute_ms(layer, option) < target.memory_ms(layer, option)
        assert target.memory_ms(layer, option) == pytest.approx(memory_ms[name])
        assert latency(target, layer, name) == pytest.approx(0.001 + memory_ms[name])  # plus 1 us overhead
    # 16x fewer bit-steps, but the memory floor keeps it from being 16x faster
    assert latency(target, layer, "w2a2") > latency(target, layer, "w8a8") / 16


def test_bit_serial_costs_are_estimated_and_exact_in_size_and_bops(layers):
    table = BitSerialTarget().costs(layers)
    assert table.target == "bit_serial_accel" and table.options == ["w8a8", "w4a8", "w4a4", "w2a4", "w2a2"]
    assert table.meta["source"] == "analytical" and table.meta["kind"] == "estimated"
    for layer in layers:
        for name, cost in table.costs[layer.name].items():
            option = Option.parse(name)
            assert cost.source == "analytical" and cost.energy_mj > 0
            assert cost.weight_bytes == layer.weight_bytes(option) and cost.bops == layer.bops(option)
    energy = [table.costs[layers[0].name][o].energy_mj for o in ("w2a2", "w4a4", "w8a8")]
    assert energy == sorted(energy)


@pytest.mark.parametrize("options", [("w8a8", "fp32"), ("w4",), ("bf16",)])
def test_bit_serial_rejects_float_and_weight_only_options(layers, options):
    with pytest.raises(ValueError, match="integers only"):
        BitSerialTarget(options=options)
    with pytest.raises(ValueError, match="integers only"):
        BitSerialTarget().costs(layers, options)


@pytest.mark.parametrize(
    ("setting", "value"),
    [("bit_gops", 0), ("bandwidth_gbs", -1.0), ("bit_gops", float("inf")), ("layer_overhead_us", -1), ("out_bits", 0)],
)
def test_bit_serial_rejects_bad_parameters(setting, value):
    with pytest.raises(ValueError, match=setting):
        BitSerialTarget(**{setting: value})


# --- presets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ANALYTICAL_PRESETS))
def test_every_preset_is_an_estimated_hardware_target(layers, name):
    target = analytical_preset(name)
    assert isinstance(target, HardwareTarget) and target.name == name
    table = target.costs(layers)
    assert table.target == name and table.meta["kind"] == "estimated"
    assert {c.source for row in table.costs.values() for c in row.values()} == {"analytical"}


def test_presets_take_overrides_and_reject_unknown_names_and_settings():
    assert analytical_preset("bit_serial_accel", bandwidth_gbs=8.0, options=["w8a8"]).options == ("w8a8",)
    assert analytical_preset("generic_cpu", int8_gmacs=10.0).int8_gmacs == 10.0
    with pytest.raises(ValueError, match=r"unknown analytical preset 'tpu'; known presets: \['bit_serial_accel'"):
        analytical_preset("tpu")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['bit_gops'\]"):
        analytical_preset("generic_cpu", bit_gops=1.0)


# --- Hydra configs -------------------------------------------------------------------------------

CONFIGS = sorted(CONF.glob("*.yaml"))


def test_every_expected_hardware_config_exists():
    names = {path.stem for path in CONFIGS}
    assert {"table", "analytical", "bit_serial_accel"} <= names  # measured cpu/cuda configs come with their targets


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_hardware_configs_load_name_a_target_and_parse_their_options(path):
    config = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(config, dict) and isinstance(config["name"], str) and config["name"]
    assert "options" in config
    if config["options"] is not None:
        parse_options(config["options"])
    text = path.read_text()
    for key in config:  # a comment line explains every key
        assert re.search(rf"^# {key}: \S", text, re.MULTILINE), f"{path.name}: no comment for {key!r}"


def settings(config) -> dict:
    """A config's target settings, as ``create_target(config.name, **settings)`` receives them."""
    values = {key: value for key, value in OmegaConf.to_container(config).items() if key != "name"}
    if values.get("options") is not None:
        values["options"] = tuple(values["options"])
    return values


def test_analytical_configs_build_their_targets():
    config = OmegaConf.load(CONF / "analytical.yaml")
    assert AnalyticalTarget(**settings(config)) == AnalyticalTarget()  # the config spells out the defaults
    config = OmegaConf.load(CONF / "bit_serial_accel.yaml")
    assert analytical_preset(config.name, **settings(config)) == BitSerialTarget()


def test_table_config_needs_a_path_and_builds_a_table_target(tmp_path, layers):
    config = OmegaConf.load(CONF / "table.yaml")
    assert OmegaConf.is_missing(config, "path")
    config.path = str(export_cost_table(AnalyticalTarget().costs(layers), layers, tmp_path / "costs.csv"))
    target = TableTarget(**settings(config))
    assert target.options == ("w8a8", "w4a8", "w2a8") and target.costs(layers).target == "table"
