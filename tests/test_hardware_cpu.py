import pytest
import torch
from conftest import make_tiny_net

import ohq_lightning as ohq
from ohq_lightning._util.timing import TimingSettings
from ohq_lightning.hardware import CPUTarget, create_target
from ohq_lightning.hardware.cpu import DEFAULT_TIMING
from ohq_lightning.hardware.cpu.fit import fit_additive, outliers
from ohq_lightning.layers import trace_layers

QUICK = TimingSettings(warmup=1, min_repeats=3, max_repeats=20, max_seconds=0.02, rel_spread=0.05)


def assert_read_from_cache_and_reanchored(cold, warm):
    """``warm`` read every sample from the cache ``cold`` wrote: the same ratios, anchored on a fresh FP32
    timing taken by each call (a cached one times it on purpose)."""
    assert warm.meta["fit"]["measured_now"] == 0 and warm.meta["fit"]["from_cache"] == cold.meta["fit"]["samples"]
    assert warm.meta["anchor"]["taken_at"] >= cold.meta["anchor"]["taken_at"]
    assert "last" in cold.meta["anchor"]["from"] and "all-INT8" in warm.meta["anchor"]["from"]
    scale = warm.meta["anchor"]["fp32_ms"] / cold.meta["anchor"]["fp32_ms"]
    # lsq_linear stops at its own tolerance
    assert warm.base_latency_ms == pytest.approx(cold.base_latency_ms * scale, rel=1e-3)


@pytest.fixture
def traced():
    model = make_tiny_net()
    example = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return model, example, trace_layers(model, example).layers


def test_cpu_target_measures_in_context_and_fits_a_cost_table(traced, tmp_path):
    model, example, layers = traced
    target = CPUTarget(samples_per_layer=2, timing=QUICK, cache_dir=tmp_path, progress=False)
    table = target.costs(layers, model=model, example_inputs=example)
    assert table.target == "cpu" and table.options == ["fp32", "w8a8", "w4a8", "w2a8"]
    assert table.base_latency_ms > 0 and set(table.transition_ms) == {layer.name for layer in layers[:-1]}
    assert all(value >= 0 for value in table.transition_ms.values())
    for layer in layers:
        row = table.costs[layer.name]
        assert {cost.source for cost in row.values()} == {"fitted"}  # from end-to-end timings, not per layer
        assert row["fp32"].latency_ms == 0.0  # integer entries are deltas against FP32 in context
        assert row["w8a8"].latency_ms == row["w4a8"].latency_ms == row["w2a8"].latency_ms  # one int8 kernel
        assert row["w4a8"].weight_bytes == row["w8a8"].weight_bytes / 2  # packed size
        assert row["fp32"].energy_mj is None  # no energy counter: absent, never invented
    fit = table.meta["fit"]
    assert fit["samples"] > fit["unknowns"] / 2 and fit["measured_now"] == fit["samples"]
    assert fit["fp32_ms"] > 0 and fit["int8_ms"] > 0


def test_a_second_profile_reads_the_cache_and_force_measures_again(traced, tmp_path):
    model, example, layers = traced
    first = CPUTarget(samples_per_layer=2, timing=QUICK, cache_dir=tmp_path, progress=False)
    cold = first.costs(layers, model=model, example_inputs=example)
    warm = first.costs(layers, model=model, example_inputs=example)
    assert_read_from_cache_and_reanchored(cold, warm)
    forced = CPUTarget(samples_per_layer=2, timing=QUICK, cache_dir=tmp_path, progress=False, force=True)
    assert forced.costs(layers, model=model, example_inputs=example).meta["fit"]["measured_now"] > 0


def test_search_on_the_cpu_target_meets_a_latency_budget(traced, tmp_path):
    model, example, _ = traced
    target = CPUTarget(samples_per_layer=2, timing=QUICK, cache_dir=tmp_path, progress=False)
    # No measure-and-refit rounds: both searches read the same cached profile, so the budget derived from
    # the first one's prediction means the same thing to the second (a refit on a busy machine moved it 2x).
    common = {"target": target, "num_samples": 4, "distill_steps": 2, "progress": False, "refine_rounds": 0}
    loose = ohq.search(model, example, compression_ratio=1.0, **common)
    budget = loose.predicted["latency_ms"] * 1.5
    plan = ohq.search(model, example, latency_budget=budget, **common)
    assert plan.predicted["latency_ms"] <= budget * (1 + 1e-9) and plan.target == "cpu"
    assert "base_latency_ms" in plan.predicted


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"options": ("fp32", "bf16")}, "cannot run in ONNX Runtime"),
        ({"options": ("w8a4",)}, "cannot run in ONNX Runtime"),
        ({"runtime": "tvm"}, "unknown runtime"),
        ({"runtime": "torch", "options": ("fp32", "bf16")}, "cannot run in torch"),
        ({"runtime": "torch", "engine": "tpu"}, "unknown torch quantized engine"),
        ({"engine": "qnnpack"}, "torch runtime only"),
        ({"threads": 0}, "threads"),
        ({"samples_per_layer": 1}, "samples_per_layer"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CPUTarget(**kwargs)


def test_the_cpu_target_needs_the_model(traced):
    _, _, layers = traced
    with pytest.raises(ValueError, match="in context"):
        create_target("cpu").costs(layers)


def test_the_table_prediction_agrees_with_the_solver(traced, tmp_path):
    model, example, _ = traced
    target = CPUTarget(samples_per_layer=2, timing=QUICK, cache_dir=tmp_path, progress=False)
    plan = ohq.search(
        model, example, target=target, compression_ratio=0.6, num_samples=4, distill_steps=2, progress=False
    )
    layers = trace_layers(model, example).layers
    table = target.costs(layers, model=model, example_inputs=example)
    scale = table.meta["anchor"]["fp32_ms"] / plan.meta["latency_anchor"]["fp32_ms"]  # each call anchors afresh
    assert table.predicted_latency_ms(plan.assignment) == pytest.approx(
        plan.predicted["latency_ms"] * scale, rel=1e-3
    )  # lsq_linear stops at its own tolerance


def test_the_hydra_config_builds_the_cpu_target():
    from pathlib import Path

    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "hardware" / "cpu.yaml"))
    target = create_target(config.pop("name"), **config)
    assert isinstance(target, CPUTarget) and target.timing == DEFAULT_TIMING  # the file says what the code does


def test_costs_with_plans_adds_the_plans_to_the_fit(traced, tmp_path):
    model, example, layers = traced
    target = CPUTarget(samples_per_layer=2, timing=QUICK, cache_dir=tmp_path, progress=False)
    base = target.costs(layers, model=model, example_inputs=example).meta["fit"]["samples"]
    odd = {layer.name: ("w8a8" if i % 2 else "fp32") for i, layer in enumerate(layers)}
    table = target.costs_with_plans(layers, model=model, example_inputs=example, plans=[odd])
    fit = table.meta["fit"]
    assert fit["samples"] in (base, base + 1) and fit["measured_now"] == fit["samples"] - base


# --- the torch runtime (torch's x86/fbgemm int8 kernels through FX) ----------------------------


def torch_target(cache_dir, **kwargs) -> CPUTarget:
    return CPUTarget(runtime="torch", samples_per_layer=2, timing=QUICK, cache_dir=cache_dir, progress=False, **kwargs)


def test_the_torch_runtime_measures_in_context_and_fits_a_cost_table(traced, tmp_path):
    model, example, layers = traced
    table = torch_target(tmp_path).costs(layers, model=model, example_inputs=example)
    assert table.target == "cpu" and table.options == ["fp32", "w8a8", "w4a8", "w2a8"]
    assert table.base_latency_ms > 0 and set(table.transition_ms) == {layer.name for layer in layers[:-1]}
    assert all(value >= 0 for value in table.transition_ms.values())
    for layer in layers:
        row = table.costs[layer.name]
        assert {cost.source for cost in row.values()} == {"fitted"}
        assert row["fp32"].latency_ms == 0.0 and row["w8a8"].latency_ms == row["w2a8"].latency_ms
    meta = table.meta
    assert meta["runtime"] == "torch" and meta["engine"] == "x86" and meta["runtime_version"].startswith("torch-")
    assert "BatchNorm folded" in meta["reference"]
    fit = meta["fit"]
    assert fit["measured_now"] == fit["samples"] > fit["unknowns"] / 2 and fit["fp32_ms"] > 0 and fit["int8_ms"] > 0
    assert 0 <= fit["retimed"] <= fit["samples"]  # samples the first fit missed badly were timed twice more


def test_the_torch_runtime_reads_its_own_cache_on_a_second_profile(traced, tmp_path):
    model, example, layers = traced
    target = torch_target(tmp_path)
    cold = target.costs(layers, model=model, example_inputs=example)
    warm = target.costs(layers, model=model, example_inputs=example)
    assert_read_from_cache_and_reanchored(cold, warm)
    # the fingerprint names the runtime and its engine: other runtimes and engines keep their own files
    ort = CPUTarget(samples_per_layer=2, timing=QUICK, cache_dir=tmp_path, progress=False)
    files = {
        cold.meta["cache_file"],
        ort.costs(layers, model=model, example_inputs=example).meta["cache_file"],
        torch_target(tmp_path, engine="qnnpack").costs(layers, model=model, example_inputs=example).meta["cache_file"],
    }
    assert len(files) == 3


def test_the_arm_config_builds_a_qnnpack_torch_target():
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(__file__).parents[1] / "conf" / "hardware" / "cpu_arm.yaml"
    config = OmegaConf.to_container(OmegaConf.load(path))
    target = create_target(config.pop("name"), **config)
    assert isinstance(target, CPUTarget) and (target.runtime, target.engine) == ("torch", "qnnpack")


def test_search_on_the_torch_runtime_meets_a_latency_budget(traced, tmp_path):
    model, example, _ = traced
    target = torch_target(tmp_path)
    # No measure-and-refit rounds: both searches read the same cached profile, so the budget derived from
    # the first one's prediction means the same thing to the second (a refit on a busy machine moved it 2x).
    common = {"target": target, "num_samples": 4, "distill_steps": 2, "progress": False, "refine_rounds": 0}
    loose = ohq.search(model, example, compression_ratio=1.0, **common)
    budget = loose.predicted["latency_ms"] * 1.5
    plan = ohq.search(model, example, latency_budget=budget, **common)
    assert plan.predicted["latency_ms"] <= budget * (1 + 1e-9) and plan.target == "cpu"


def test_a_sample_the_fit_misses_is_flagged_for_timing_again():
    import itertools

    import numpy as np

    kappa, transitions = np.array([-1.0, -2.0, 0.5, -0.5]), np.array([0.3, 0.2, 0.1])
    measured = {}
    for combo in itertools.product("01", repeat=4):
        bits = "".join(combo)
        x = np.array([c == "1" for c in bits], dtype=float)
        measured[bits] = 10.0 + x @ kappa + np.abs(np.diff(x)) @ transitions
    skewed = "0110"
    measured[skewed] *= 1.4  # a burst of load during this sample's window
    fit = fit_additive(measured, 4, seed=0)
    flagged = outliers(measured, fit, candidates=set(measured))
    assert flagged[0] == skewed
    assert outliers(measured, fit, candidates={"0000"}) == []


def test_time_plans_times_whole_graphs_and_plans_that_run_alike_share_one(traced, tmp_path):
    model, example, layers = traced
    target = CPUTarget(timing=QUICK, cache_dir=tmp_path, progress=False)
    names = [layer.name for layer in layers]
    fp32, int8, int4 = (dict.fromkeys(names, option) for option in ("fp32", "w8a8", "w4a8"))
    measured = target.time_plans(layers, [fp32, int8, int4], model=model, example_inputs=example)
    assert len(measured) == 3 and all(ms > 0 for ms in measured)
    assert measured[1] == measured[2]  # w4a8 runs on the int8 kernel: the same graph, timed once


def test_a_latency_search_on_the_cpu_target_returns_the_fastest_plan_it_timed(traced, tmp_path):
    model, example, _ = traced
    target = CPUTarget(samples_per_layer=2, timing=QUICK, cache_dir=tmp_path, progress=False)
    plan = ohq.search(model, example, target=target, num_samples=4, distill_steps=2, progress=False, refine_rounds=1)
    guard = plan.meta["fastest_measured"]  # minimize=auto, no budget: the fastest plan as accurate as INT8
    assert guard is not None and "plan" in guard["measured_ms"]
    assert guard["winner"] == min(guard["measured_ms"], key=guard["measured_ms"].get)
    assert guard["plan_over_winner"] >= 1.0 and plan.meta["plan_measured"] is True
