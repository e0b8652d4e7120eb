"""Robustness: unexpected models, bad budgets, damaged files, killed jobs, and properties checked at random.

Each test states one behaviour a user can rely on when something is off. Cases covered elsewhere
are named in the module docstring of the test file that covers them:

* a non-finite QAT loss stops with the offending layers named: ``test_callback.py``
  (``QATDivergedError``);
* CLI typos and wrong types, an unknown recipe: ``test_cli.py``;
* malformed cost tables (CSV/JSON, missing rows listed at once): ``test_hardware_table.py``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from conftest import make_tiny_net
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ohq_lightning as ohq
from ohq_lightning._util.timing import Timing
from ohq_lightning.hardware.cache import TimingCache
from ohq_lightning.plan import CostTable, LayerCost, QuantPlan, SensitivityTable
from ohq_lightning.quant import QuantLayer, apply_plan, quantized_layers, strip_plan
from ohq_lightning.solver import InfeasibleBudgetError, solve

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"target": "analytical", "synthetic": "gaussian", "num_samples": 2, "progress": False}


# ----------------------------------------------------------------------------- models


class _NoLayers(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).mean(dim=(2, 3))


class _Unusual(nn.Module):
    """Conv1d and ConvTranspose2d (not quantizable here) beside a Linear that is."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
        self.seq = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        x = self.seq(x.flatten(2)).mean(dim=2)
        return self.head(x)


class _Twice(nn.Module):
    """One conv called twice, and two Linears sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(torch.relu(self.stem(x))).mean(dim=(2, 3))
        return self.head(self.b(self.a(x)))


def float_weight_of(model: nn.Module, name: str) -> nn.Parameter:
    """The weight Parameter of layer ``name``, through its fake-quant wrapper if it has one."""
    module = model.get_submodule(name)
    return module.module.weight if isinstance(module, QuantLayer) else module.weight


class _TwoInputs(nn.Module):
    """``forward(image, extra, *, scale)``: tuple arguments and a keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 + 2, 3)

    def forward(self, image: torch.Tensor, extra: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        features = self.conv(image).mean(dim=(2, 3))
        return self.head(torch.cat([features, extra], dim=1)) * scale


def test_a_model_without_quantizable_layers_is_refused_clearly():
    with pytest.raises(ValueError, match="no quantizable layer"):
        ohq.search(_NoLayers(), torch.randn(1, 3, 8, 8), compression_ratio=0.5, **QUICK)


def test_conv1d_and_transposed_convs_are_reported_and_stay_float():
    model = _Unusual().eval()
    x = torch.randn(1, 3, 4, 4)
    trace = ohq.trace_layers(model, x)
    assert trace.names() == ["head"]
    assert set(trace.skipped) == {"up", "seq"}
    assert all(reason for reason in trace.skipped.values())
    plan = ohq.search(model, x, compression_ratio=0.5, **QUICK)
    assert set(plan.assignment) == {"head"}
    apply_plan(model, plan)
    assert set(quantized_layers(model)) <= {"head"} and type(model.up) is nn.ConvTranspose2d
    assert torch.isfinite(model(x)).all()


def test_a_module_called_twice_is_one_layer_and_a_weight_sharer_stays_float():
    model = _Twice().eval()
    x = torch.randn(2, 3, 6, 6)
    trace = ohq.trace_layers(model, x)
    assert "stem" in trace.names() and trace.names().count("stem") == 1
    assert "b" not in trace.names() and "a" in trace.skipped["b"]  # the first owner is quantizable, the sharer not
    plan = ohq.search(model, x, compression_ratio=0.6, **QUICK)
    apply_plan(model, plan)
    assert torch.isfinite(model(x)).all()
    assert type(model.b) is nn.Linear
    assert float_weight_of(model, "a") is model.b.weight  # the sharing survives the swap


@pytest.mark.parametrize("how", ["tuple", "dict"])
def test_tuple_and_keyword_inputs_are_traced_planned_and_quantized(how):
    model = _TwoInputs().eval()
    image, extra = torch.randn(2, 3, 8, 8), torch.randn(2, 2)
    example = (image, extra) if how == "tuple" else {"image": image, "extra": extra, "scale": 2.0}
    with pytest.raises(ValueError, match=r"one input tensor.*weight_error"):  # MQE's synthetic inputs cannot
        ohq.search(model, example, compression_ratio=0.6, **QUICK)
    plan = ohq.search(model, example, compression_ratio=0.6, sensitivity="weight_error", **QUICK)
    assert set(plan.assignment) == {"conv", "head"}
    apply_plan(model, plan)
    out = model(image, extra) if how == "tuple" else model(**example)
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_a_tf_variant_with_same_padding_convs_is_searched_and_runs():
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    same = [name for name, module in model.named_modules() if type(module).__name__ == "Conv2dSame"]
    assert same, "this variant is expected to hold timm Conv2dSame layers"
    plan = ohq.search(model, x, compression_ratio=0.5, **QUICK)
    assert set(same) <= set(plan.assignment)
    apply_plan(model, plan)
    assert torch.isfinite(model(x)).all()


def test_a_second_plan_on_a_quantized_model_is_refused_until_stripped():
    model = make_tiny_net()
    apply_plan(model, {"stem.0": "w8a8"})
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(ValueError, match=r"already quantized.*strip_plan"):
        apply_plan(model, {"stem.0": "w4a8", "fc": "w8a8"})
    assert {name: type(module) for name, module in model.named_modules()} == before  # nothing half-applied
    strip_plan(model)
    apply_plan(model, {"stem.0": "w4a8", "fc": "w8a8"})
    assert set(quantized_layers(model)) == {"stem.0", "fc"}


def test_a_plan_for_another_model_names_every_missing_layer():
    model = make_tiny_net()
    with pytest.raises(ValueError) as error:
        apply_plan(model, {"stem.0": "w8a8", "layer9.conv": "w4a8", "head.fc": "w8a8"})
    assert "layer9.conv" in str(error.value) and "head.fc" in str(error.value)
    assert not quantized_layers(model)


# ----------------------------------------------------------------------------- budgets


def _tables(layers: int = 4) -> tuple[SensitivityTable, CostTable]:
    options = ["w2a8", "w4a8", "w8a8"]
    costs, scores, int8 = {}, {}, {}
    for index in range(layers):
        name = f"l{index}"
        size = 100.0 * (index + 1)
        int8[name] = size
        costs[name] = {
            o: LayerCost(weight_bytes=size * int(o[1]) / 8, bops=size * int(o[1]) * 8, latency_ms=0.1 * int(o[1]))
            for o in options
        }
        scores[name] = {o: (index + 1) * 2.0 ** -int(o[1]) for o in options}
    return SensitivityTable("kl", scores), CostTable("t", options, costs, int8)


def test_an_infeasible_budget_names_the_smallest_feasible_one_which_then_solves():
    scores, costs = _tables()
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible compression_ratio is") as error:
        solve(scores, costs, compression_ratio=0.1)
    smallest = error.value.smallest_feasible["compression_ratio"]
    assert smallest == pytest.approx(0.25, rel=1e-4)  # everything at 2 bits
    plan = solve(scores, costs, compression_ratio=smallest)
    assert set(plan.assignment.values()) == {"w2a8"}


def test_conflicting_budgets_are_reported_with_each_ones_smallest_feasible_value():
    scores, costs = _tables()
    least = sum(min(row.values()) for row in scores.scores.values())
    with pytest.raises(InfeasibleBudgetError) as error:
        solve(scores, costs, compression_ratio=0.3, sensitivity_budget=least * 1.01)
    assert {"compression_ratio", "sensitivity_budget"} <= set(error.value.smallest_feasible)
    assert "compression_ratio" in str(error.value) and "sensitivity_budget" in str(error.value)


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({"compression_ratio": 60}, r"\(0, 4\].*got 60.*give 0\.6"),  # a percentage given as a ratio
        ({"compression_ratio": -0.5}, "compression_ratio"),
        ({"latency_budget": 0}, "latency_budget"),
        ({"latency_budget": -3.0}, "latency_budget"),
        ({"bops_budget": float("nan")}, "bops_budget"),
        ({"sensitivity_budget": "w9z9"}, "sensitivity_budget"),
        ({"compression_ratio": "half"}, "compression_ratio"),
    ],
)
def test_budgets_in_the_wrong_unit_sign_or_type_fail_before_any_work(budget, message):
    with pytest.raises(ValueError, match=message):
        ohq.search(make_tiny_net(), torch.randn(1, 3, 16, 16), **QUICK, **budget)


# ----------------------------------------------------------------------------- files


def test_a_truncated_timing_cache_is_rebuilt_with_a_warning(tmp_path):
    cache = TimingCache(tmp_path, {"cpu": "x"})
    cache.put("a", Timing(1.0, 0.01, 10))
    cache.save()
    assert cache.path is not None
    cache.path.write_text(cache.path.read_text()[:20])
    with pytest.warns(UserWarning, match="rebuil|unreadable|corrupt"):
        again = TimingCache(tmp_path, {"cpu": "x"})
    assert again.get("a") is None
    again.put("b", Timing(2.0, 0.01, 10))
    again.save()
    assert json.loads(again.path.read_text())  # valid again
    assert TimingCache(tmp_path, {"cpu": "x"}).get("b") == Timing(2.0, 0.01, 10)


def test_an_unwritable_cache_directory_warns_and_keeps_the_measurements_in_memory(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the cache directory should be")
    cache = TimingCache(blocker / "cache", {"cpu": "x"})
    cache.put("a", Timing(1.0, 0.01, 10))
    with pytest.warns(UserWarning):
        cache.save()
    assert cache.get("a") == Timing(1.0, 0.01, 10)
    assert blocker.read_text().startswith("a file")


def _hammer_cache(directory: str, worker: int) -> None:
    for round_ in range(30):
        cache = TimingCache(directory, {"cpu": "shared"})
        cache.put(f"w{worker}-{round_}", Timing(float(round_), 0.0, 1))
        cache.save()


def test_two_processes_writing_one_cache_never_leave_a_corrupt_file(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_hammer_cache, args=(str(tmp_path), w)) for w in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp*"))
    data = json.loads(files[0].read_text())  # whole, parseable
    assert data


@pytest.mark.parametrize("content", ["{not json", '{"assignment": {"a": "w8a8"}}', "[1, 2, 3]", ""])
def test_a_malformed_plan_file_fails_with_the_file_named(tmp_path, content):
    path = tmp_path / "broken_plan.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"broken_plan\.json"):
        QuantPlan.from_json(path)


def test_nothing_read_back_from_disk_uses_pickle():
    offenders = []
    for path in (ROOT / "ohq_lightning").rglob("*.py"):
        text = path.read_text()
        if re.search(r"\bpickle\.loads?\(|\bnp\.load\([^)]*allow_pickle=True", text):
            offenders.append(f"{path.name}: pickle")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=" not in call:  # True, or the caller's choice mirrored from Lightning's fit/test
                offenders.append(f"{path.name}: {call}")
    assert not offenders
    assert int(torch.__version__.split(".")[0]) > 2 or int(torch.__version__.split(".")[1]) >= 6  # default True


# ----------------------------------------------------------------------------- killed jobs

_KILLED_FIT = textwrap.dedent(
    """
    import os, signal, sys, json
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    sys.path.insert(0, {tests!r})
    from lightning_helpers import TinyCNN, image_loader
    from ohq_lightning.callback import OHQCallback

    root, kill_at = sys.argv[1], int(sys.argv[2])

    # Every search adds a line to searches.log naming the run that searched. The callback calls ``search``
    # through whichever module imported it: replace the name in every loaded ohq_lightning module.
    depth = [0]

    def logged(search):
        def logged_search(*args, **kwargs):
            if depth[0] == 0:  # one line per search, also when one ``search`` calls another
                with open(root + "/searches.log", "a") as log:
                    log.write(f"{{kill_at}}\\n")
            depth[0] += 1
            try:
                return search(*args, **kwargs)
            finally:
                depth[0] -= 1
        return logged_search

    modules = [module for name, module in list(sys.modules.items()) if name.startswith("ohq_lightning")]
    for module in modules:
        found = getattr(module, "search", None)
        if callable(found) and getattr(found, "__module__", "").startswith("ohq_lightning"):
            module.search = logged(found)

    class KillAt(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint

    ohq = OHQCallback(compression_ratio=0.6, synthetic="gaussian", num_samples=4, progress=False)
    checkpoint = ModelCheckpoint(dirpath=root + "/ckpt", save_last=True, every_n_train_steps=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=12, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=[ohq, checkpoint, KillAt()])
    last = root + "/ckpt/last.ckpt"
    trainer.fit(TinyCNN(), image_loader(64, batch_size=8), ckpt_path=last if os.path.exists(last) else None)
    print(json.dumps({{"plan": ohq.plan.assignment, "step": trainer.global_step}}))
    """
)


@pytest.mark.slow
def test_a_fit_killed_mid_epoch_resumes_from_its_last_checkpoint_with_the_same_plan(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(_KILLED_FIT.format(tests=str(ROOT / "tests")))
    killed = subprocess.run([sys.executable, str(script), str(tmp_path), "5"], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    saved_step = checkpoint["global_step"]
    assert 0 < saved_step < 5
    planned = json.loads((next(tmp_path.rglob("plan.json"))).read_text())["assignment"]
    searches = tmp_path / "searches.log"
    assert searches.read_text().splitlines() == ["5"]  # the killed run searched, once
    resumed = subprocess.run([sys.executable, str(script), str(tmp_path), "-1"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["step"] == 12
    assert result["plan"] == planned
    assert searches.read_text().splitlines() == ["5"]  # the resumed run took the plan from the checkpoint: no search


# ----------------------------------------------------------------------------- properties


@st.composite
def _small_problem(draw):
    options = draw(st.lists(st.sampled_from(["w2a8", "w4a8", "w8a8", "fp32"]), min_size=1, max_size=3, unique=True))
    layers = draw(st.integers(1, 5))
    bits = {"w2a8": 2, "w4a8": 4, "w8a8": 8, "fp32": 32}
    costs, scores, int8 = {}, {}, {}
    for index in range(layers):
        name = f"layer{index}"
        size = float(draw(st.integers(1, 1000)))
        int8[name] = size
        costs[name] = {
            o: LayerCost(
                weight_bytes=size * bits[o] / 8,
                bops=size * bits[o] * 8,
                latency_ms=draw(st.floats(0.0, 5.0, allow_nan=False)),
            )
            for o in options
        }
        scores[name] = {o: draw(st.floats(0.0, 10.0, allow_nan=False)) for o in options}
    ratio = draw(st.floats(0.05, 1.0))
    return SensitivityTable("kl", scores), CostTable("t", options, costs, int8), ratio


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_small_problem())
def test_the_ilp_matches_brute_force(problem):
    scores, costs, ratio = problem
    layers, options = costs.layers, costs.options
    limit = ratio * sum(costs.int8_weight_bytes.values())
    best = math.inf
    import itertools

    for choice in itertools.product(options, repeat=len(layers)):
        size = sum(costs.costs[name][o].weight_bytes for name, o in zip(layers, choice, strict=True))
        if size <= limit * (1 + 1e-9):
            best = min(best, sum(scores.scores[name][o] for name, o in zip(layers, choice, strict=True)))
    if math.isinf(best):
        with pytest.raises(InfeasibleBudgetError):
            solve(scores, costs, compression_ratio=ratio)
        return
    plan = solve(scores, costs, compression_ratio=ratio)
    total = sum(scores.scores[name][plan.assignment[name]] for name in layers)
    assert total == pytest.approx(best, rel=1e-6, abs=1e-6)
    assert plan.predicted["weight_bytes"] <= limit * (1 + 1e-6)


_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(_names, st.sampled_from(["fp32", "w8a8", "w4a8", "w2a8", "bf16"]), min_size=1, max_size=6),
    st.dictionaries(st.sampled_from(["size_ratio", "sensitivity", "latency_ms"]), _finite),
    st.dictionaries(_names, st.one_of(_finite, st.text(max_size=8), st.booleans(), st.none()), max_size=4),
)
def test_plans_round_trip_through_json(assignment, predicted, meta):
    plan = QuantPlan(assignment=assignment, predicted=predicted, meta=meta, options=sorted(set(assignment.values())))
    assert QuantPlan.from_json(plan.to_json()) == plan


@settings(max_examples=30, deadline=None)
@given(
    st.dictionaries(
        _names,
        st.fixed_dictionaries(
            {"w8a8": st.tuples(_finite, _finite, st.one_of(st.none(), _finite)), "fp32": st.tuples(_finite, _finite)}
        ),
        min_size=1,
        max_size=4,
    )
)
def test_cost_and_sensitivity_tables_round_trip_through_json(rows):
    costs = CostTable(
        target="t",
        options=["w8a8", "fp32"],
        costs={
            name: {
                "w8a8": LayerCost(weight_bytes=r["w8a8"][0], bops=r["w8a8"][1], latency_ms=r["w8a8"][2]),
                "fp32": LayerCost(weight_bytes=r["fp32"][0], bops=r["fp32"][1], source="measured"),
            }
            for name, r in rows.items()
        },
        int8_weight_bytes={name: r["w8a8"][0] for name, r in rows.items()},
        transition_ms={name: r["fp32"][1] for name, r in rows.items()},
    )
    assert CostTable.from_json(costs.to_json()) == costs
    scores = SensitivityTable("kl", {name: {"w8a8": r["w8a8"][0], "fp32": 0.0} for name, r in rows.items()})
    assert SensitivityTable.from_json(scores.to_json()) == scores
