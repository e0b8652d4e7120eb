"""Tests for how the cpu target spends its timing: mixes timed together with one FP32 run, picked plans
timed three times, a cached FP32 reference refined rather than replaced, milliseconds anchored on an
FP32 timing taken at the end of each call, and one deployment per model shared by a whole search.

The clock is scripted (``time_interleaved`` replaced by one that reads each runner's latency), so the
figures are exact; the graphs themselves are fakes that record what was built.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_net

import ohq_lightning as ohq
from ohq_lightning._util.timing import Timing, TimingSettings
from ohq_lightning.hardware import CPUTarget
from ohq_lightning.hardware.cache import TimingCache
from ohq_lightning.hardware.cpu import _profile, target
from ohq_lightning.hardware.cpu._profile import GRAPHS_PER_RUN, REFERENCE, Profiler
from ohq_lightning.hardware.cpu._runtimes import Deployment
from ohq_lightning.layers import trace_layers

QUICK = TimingSettings(warmup=1, min_repeats=3, max_repeats=20, max_seconds=0.02, rel_spread=0.05)
FP32_MS, INT8_GAIN_MS = 10.0, 0.5


class ScriptedClock:
    """Stands in for ``time_interleaved``: each runner's median is its ``ms`` times the machine's speed
    factor, which grows by ``drift`` per run (a machine slowing down), so ratios within a run hold."""

    def __init__(self, drift: float = 0.0) -> None:
        self.drift = drift
        self.runs: list[int] = []  # graphs per run, FP32 included

    def __call__(self, fns, settings=None):
        factor = 1.0 + self.drift * len(self.runs)
        self.runs.append(len(fns))
        return [Timing(fn.ms * factor, 0.01, 10) for fn in fns]


def fake_deployment(built: list[str], ms=None) -> Deployment:
    """A deployment whose graphs take ``ms(bits)`` (default: FP32 minus 0.5 ms per integer layer)."""
    ms = ms or (lambda bits: FP32_MS - INT8_GAIN_MS * bits.count("1"))

    def build(bits: str):
        built.append(bits)
        return _run_of(ms(bits))

    return Deployment("fake", "fake-1", lambda: _run_of(FP32_MS), build)


def test_mixes_are_timed_together_with_one_fp32_run(monkeypatch):
    clock = ScriptedClock()
    monkeypatch.setattr(_profile, "time_interleaved", clock)
    built: list[str] = []
    profiler = Profiler(fake_deployment(built), TimingCache(None, {"t": 1}), QUICK, progress=False)
    plans = [f"{i:04b}" for i in range(1, 16)]
    profiler.measure(plans, picked=())
    assert built == plans  # each graph built once
    full, rest = divmod(len(plans), GRAPHS_PER_RUN)
    assert clock.runs == [GRAPHS_PER_RUN + 1] * full + [rest + 1] * bool(rest)  # each run with one FP32 graph
    for bits in plans:
        assert profiler.cache.get(bits).median_ms == pytest.approx((FP32_MS - INT8_GAIN_MS * bits.count("1")) / FP32_MS)
    assert profiler.measured(plans)["1001"] == pytest.approx(FP32_MS - 2 * INT8_GAIN_MS)


def test_picked_plans_are_timed_in_three_runs_and_the_median_kept(monkeypatch):
    medians = iter([0.9, 0.7, 0.8])  # the picked plan's ratio in its three runs

    def clock(fns, settings=None):
        return [Timing(next(medians) * FP32_MS, 0.01, 10), Timing(FP32_MS, 0.01, 10)]

    monkeypatch.setattr(_profile, "time_interleaved", clock)
    built: list[str] = []
    profiler = Profiler(fake_deployment(built), TimingCache(None, {"t": 1}), QUICK, progress=False)
    profiler.measure(["0110"], picked={"0110"})
    assert built == ["0110"] and profiler.cache.get("0110").median_ms == pytest.approx(0.8)


def test_a_cached_fp32_reference_is_refined_not_replaced(monkeypatch):
    monkeypatch.setattr(_profile, "time_interleaved", ScriptedClock())
    cache = TimingCache(None, {"t": 1})
    cache.put("0000", Timing(1.0, 0.0, 10))
    cache.put(REFERENCE, Timing(8.0, 0.0, 41))  # 41 runs of a profile at 8 ms
    profiler = Profiler(fake_deployment([]), cache, QUICK, progress=False)
    profiler.measure(["0011"], picked=())  # one run at 10 ms: a refinement round
    assert cache.get(REFERENCE) == Timing(8.0, 0.0, 42)


def test_the_milliseconds_are_anchored_on_fp32_timed_at_the_end(monkeypatch):
    model = make_tiny_net()
    example = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    layers = trace_layers(model, example).layers
    count = len(layers)
    clock = ScriptedClock(drift=0.01)  # the machine slows by 1% a run: ratios hold, milliseconds drift
    monkeypatch.setattr(_profile, "time_interleaved", clock)
    built: list[str] = []
    ms = lambda bits: FP32_MS - INT8_GAIN_MS * bits.count("1")  # noqa: E731
    deployment = Deployment("fake", "fake-1", lambda: _run_of(FP32_MS), fake_deployment(built, ms).build)
    monkeypatch.setattr(target, "build_deployment", lambda *args, **kwargs: deployment)
    table = CPUTarget(timing=QUICK, cache_dir=False, progress=False).costs(layers, model=model, example_inputs=example)
    anchor = table.meta["anchor"]
    last = 1.0 + 0.01 * (len(clock.runs) - 2)  # the anchor: the median of the last three runs
    assert anchor["fp32_ms"] == pytest.approx(FP32_MS * last) and "last 3 runs" in anchor["from"]
    assert anchor["int8_ratio"] == pytest.approx(ms("1" * count) / FP32_MS)
    assert anchor["this_call_runs_fp32_ms"]["first"] == pytest.approx(FP32_MS)  # the profile's first run
    assert table.meta["fit"]["fp32_ms"] == pytest.approx(FP32_MS * last)  # the table speaks of the machine now
    assert table.predicted_latency_ms(dict.fromkeys(table.layers, "w8a8")) == pytest.approx(
        ms("1" * count) * last, rel=1e-4
    )


def _run_of(ms: float):
    def run() -> None:
        return None

    run.ms = ms  # type: ignore[attr-defined]
    return run


def test_a_search_deploys_its_model_once(monkeypatch, tmp_path):
    model = make_tiny_net()
    example = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    deployments = []
    real = target.build_deployment

    def counting(*args, **kwargs):
        deployments.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(target, "build_deployment", counting)
    cpu = CPUTarget(samples_per_layer=2, timing=QUICK, cache_dir=tmp_path, progress=False)
    plan = ohq.search(model, example, target=cpu, minimize="latency", num_samples=4, distill_steps=2, progress=False)
    assert plan.meta["plans_measured_in_refinement"] >= 1  # profile, refinement and final timing all ran
    assert deployments == ["onnxruntime"]
    trained = copy.deepcopy(model)
    with torch.no_grad():
        next(trained.parameters()).add_(0.5)  # other weights (a trained model): a deployment of its own
    ohq.search(trained, example, target=cpu, minimize="latency", num_samples=4, distill_steps=2, progress=False)
    assert len(deployments) == 2
