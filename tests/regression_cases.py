"""Stored search problems and the plans the library returned for them, to prove refactors change no plan.

``python tests/regression_cases.py`` rebuilds ``tests/data/regression/*.json`` from the code as it is:
run it only when a change of plans is intended, and say so in the CHANGELOG. The tables are made once
(analytical costs with transition costs and a base latency added, MQE scores on Gaussian inputs) and
stored, so the test replays the solver on fixed numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import timm
import torch

from ohq_lightning import CostTable, SensitivityTable, search, solve
from ohq_lightning.hardware import create_target
from ohq_lightning.layers import trace_layers
from ohq_lightning.sensitivity import gaussian_inputs, mqe_sensitivity

DATA = Path(__file__).parent / "data" / "regression"
MODELS = {"resnet18": 32, "mobilenetv3_small_100": 32}
OPTIONS = ["fp32", "w8a8", "w4a8", "w2a8"]


class StoredTarget:
    """A hardware target that returns a stored cost table (what ``search`` sees as a target's costs)."""

    name = "stored"

    def __init__(self, table: CostTable) -> None:
        self.table = table
        self.options = list(table.options)

    def costs(self, layers: Any, options: Any, **_: Any) -> CostTable:
        """The stored table, whatever is asked."""
        return self.table


def build_model(name: str) -> torch.nn.Module:
    """The model a case was made from, with fixed weights."""
    torch.manual_seed(0)
    extra = {"zero_init_last": False} if name.startswith("resnet") else {}  # untrained residual blocks count too
    return timm.create_model(name, pretrained=False, num_classes=10, **extra).eval()


def example_input(name: str) -> torch.Tensor:
    """The example input of a case's model."""
    return torch.zeros(1, 3, MODELS[name], MODELS[name])


def _tables(name: str) -> tuple[CostTable, SensitivityTable]:
    model, example = build_model(name), example_input(name)
    layers = trace_layers(model, example).layers
    costs = create_target("analytical").costs(layers, OPTIONS)
    costs.transition_ms = {layer.name: 0.001 * (index % 5 + 1) for index, layer in enumerate(layers[:-1])}
    costs.base_latency_ms = 0.05
    inputs = gaussian_inputs(example, 4, seed=0)
    scores = mqe_sensitivity(model, inputs, layers, OPTIONS, seed=0, progress=False)
    return costs, scores


def solve_cases(costs: CostTable, scores: SensitivityTable) -> dict[str, dict[str, Any]]:
    """The keyword arguments of :func:`solve` for each stored case, derived from the tables' own numbers."""
    layers = costs.layers
    fastest = costs.predicted_latency_ms(
        {n: min(costs.costs[n], key=lambda o: costs.costs[n][o].latency_ms) for n in layers}
    )
    slowest = costs.predicted_latency_ms(dict.fromkeys(layers, "fp32"))
    int8_bops = sum(costs.costs[n]["w8a8"].bops for n in layers)
    int8_energy = sum(costs.costs[n]["w8a8"].energy_mj for n in layers)
    int8_sensitivity = sum(scores.scores[n]["w8a8"] for n in layers)
    return {
        "ratio_0.6": {"compression_ratio": 0.6},
        "ratio_0.35": {"compression_ratio": 0.35},
        "latency_mid": {"latency_budget": (fastest + slowest) / 2},
        "bops_0.5": {"bops_budget": 0.5 * int8_bops},
        "energy_0.7": {"energy_budget": 0.7 * int8_energy},
        "fastest_under_int8_x1.5": {"minimize": "latency", "sensitivity_budget": 1.5 * int8_sensitivity},
        "ratio_0.7_cost_weight": {"compression_ratio": 0.7, "cost_weight": 0.5},
        "ratio_0.5_tied": {"compression_ratio": 0.5, "tie_groups": [layers[:2], layers[2:4]]},
        "ratio_0.6_no_fp32": {"compression_ratio": 0.6, "options": ["w8a8", "w4a8", "w2a8"]},
    }


SEARCH_CASES: dict[str, dict[str, Any]] = {
    "ratio_0.6": {"compression_ratio": 0.6},
    "fastest_as_good_as_int8": {"minimize": "latency", "sensitivity_budget": "w8a8"},
    "ratio_0.5_latency_weighted": {"compression_ratio": 0.5, "cost_weight": 0.3},
}


def run_search(name: str, costs: CostTable, scores: SensitivityTable, case: dict[str, Any]) -> dict[str, str]:
    """The assignment ``search`` returns for one stored case (stored tables in place of measuring)."""
    plan = search(
        build_model(name), example_input(name), target=StoredTarget(costs), sensitivity=scores, progress=False, **case
    )
    return plan.assignment


def _write(name: str) -> None:
    costs, scores = _tables(name)
    plans = {key: solve(scores, costs, **kwargs).assignment for key, kwargs in solve_cases(costs, scores).items()}
    searched = {key: run_search(name, costs, scores, case) for key, case in SEARCH_CASES.items()}
    document = {
        "model": name,
        "costs": costs.to_dict(),
        "sensitivity": scores.to_dict(),
        "solve_plans": plans,
        "search_plans": searched,
    }
    (DATA / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    DATA.mkdir(parents=True, exist_ok=True)
    for model_name in sys.argv[1:] or MODELS:
        _write(model_name)
