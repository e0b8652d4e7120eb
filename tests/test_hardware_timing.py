import json
import time

import pytest

from ohq_lightning._util.timing import RaplEnergyMeter, Timing, TimingSettings, time_callable
from ohq_lightning.hardware.cache import TimingCache, cpu_model_name


def test_time_callable_measures_a_known_duration():
    timing = time_callable(lambda: time.sleep(0.002), TimingSettings(warmup=1, min_repeats=5, max_seconds=0.2))
    assert 1.9 < timing.median_ms < 20
    assert timing.repeats >= 5 and timing.spread >= 0


def test_time_callable_stops_at_the_cap():
    settings = TimingSettings(warmup=0, min_repeats=3, max_repeats=10_000, max_seconds=0.05, rel_spread=1e-9)
    started = time.perf_counter()
    timing = time_callable(lambda: time.sleep(0.001), settings)
    assert time.perf_counter() - started < 1.0 and 3 <= timing.repeats < 10_000


def test_a_fast_operation_is_timed_for_at_least_min_seconds():
    # the stopping rule would end this at min_repeats (a constant operation has no spread); min_seconds holds it
    settings = TimingSettings(warmup=0, min_repeats=3, max_repeats=100_000, max_seconds=1.0, min_seconds=0.05)
    started = time.perf_counter()
    timing = time_callable(lambda: None, settings)
    assert time.perf_counter() - started >= 0.05 and timing.repeats > 100
    quick = time_callable(lambda: None, TimingSettings(warmup=0, min_repeats=3, max_seconds=1.0))
    assert quick.repeats < timing.repeats
    capped = TimingSettings(warmup=0, min_repeats=3, max_repeats=100_000, max_seconds=0.01, min_seconds=5.0)
    started = time.perf_counter()
    time_callable(lambda: None, capped)  # a config lowering max_seconds alone is obeyed, not refused
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_repeats": 0},
        {"max_repeats": 2, "min_repeats": 5},
        {"max_seconds": 0},
        {"rel_spread": -1},
        {"min_seconds": -0.1},
    ],
)
def test_bad_timing_settings_are_rejected(kwargs):
    with pytest.raises(ValueError, match="timing settings"):
        TimingSettings(**kwargs)


def test_cache_round_trip_and_fingerprint_separation(tmp_path):
    fingerprint = {"cpu": cpu_model_name(), "runtime": "onnxruntime", "threads": 1}
    cache = TimingCache(tmp_path, fingerprint)
    cache.put("conv2d|fp32", Timing(0.5, 0.01, 9))
    cache.save()
    assert TimingCache(tmp_path, fingerprint).get("conv2d|fp32") == Timing(0.5, 0.01, 9)
    other = TimingCache(tmp_path, {**fingerprint, "threads": 2})
    assert other.get("conv2d|fp32") is None and other.path != cache.path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_corrupt_cache_is_rebuilt_with_a_warning(tmp_path):
    cache = TimingCache(tmp_path, {"cpu": "x"})
    cache.put("a", Timing(1.0, 0.0, 7))
    cache.save()
    cache.path.write_text("{ not json")
    with pytest.warns(UserWarning, match="rebuilding"):
        again = TimingCache(tmp_path, {"cpu": "x"})
    assert len(again) == 0
    again.put("a", Timing(2.0, 0.0, 7))
    again.save()
    assert json.loads(cache.path.read_text())["entries"]["a"]["median_ms"] == 2.0


def test_an_unwritable_cache_path_warns_and_keeps_the_cache_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    cache = TimingCache(blocker / "sub", {"cpu": "x"})
    cache.put("a", Timing(1.0, 0.0, 7))
    with pytest.warns(UserWarning, match="in memory"):
        cache.save()
    assert cache.get("a") == Timing(1.0, 0.0, 7) and blocker.read_text().startswith("a file")


def test_rapl_meter_reports_nothing_where_counters_are_absent(tmp_path):
    meter = RaplEnergyMeter(tmp_path)
    assert not meter.available and meter.measure_mj(lambda: None, 3) is None


def test_rapl_meter_reads_counters(tmp_path):
    counter = tmp_path / "intel-rapl:0" / "energy_uj"
    counter.parent.mkdir()
    counter.write_text("1000\n")
    meter = RaplEnergyMeter(tmp_path)
    assert meter.available

    def work():
        counter.write_text(str(int(counter.read_text()) + 500))

    assert meter.measure_mj(work, 4) == pytest.approx(0.5)


def test_rapl_meter_counts_packages_not_their_subzones(tmp_path):
    for name, value in [("intel-rapl:0", 1000), ("intel-rapl:1", 2000), ("intel-rapl:0:0", 700), ("intel-rapl:1:2", 5)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "energy_uj").write_text(f"{value}\n")
    meter = RaplEnergyMeter(tmp_path)
    assert meter.available and meter.read_uj() == 3000


def test_interleaved_timing_ranks_operations_and_reports_each():
    from ohq_lightning._util.timing import time_interleaved

    short, long = time_interleaved(
        [lambda: time.sleep(0.001), lambda: time.sleep(0.003)],
        TimingSettings(warmup=1, min_repeats=5, max_seconds=0.3),
    )
    assert short.repeats == long.repeats >= 5
    assert 2.0 < long.median_ms / short.median_ms < 4.5
