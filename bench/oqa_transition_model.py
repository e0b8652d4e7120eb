"""Does the cpu target's cost model need the graph's edges, or do forward-order boundaries do?

The measured ``cpu`` target fits ``base + sum(integer-layer deltas) + sum(transitions)`` to
in-context timings, with a transition at each boundary between consecutive layers in forward order
(exact for chains). Networks with branches (residual adds, squeeze-excite) change precision along
their graph's edges instead. This bench profiles each model with the ``cpu`` target (or reuses a
cache directory), finds the edges between quantizable layers with ``torch.fx``, and refits the
same samples three ways -- forward-order boundaries (what the target does), graph edges, and both
-- comparing in-sample residuals and errors on held-out samples over repeated random 80/20 splits.
It prints one JSON object; ``holdout_median_over_chain`` below 1 means the edge model predicts
unseen plans better than the one the target uses.

    python bench/oqa_transition_model.py [--models mobilenetv3_small_100] [--runtime onnxruntime torch]
        [--threads 1] [--size 224] [--splits 40] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from scipy.optimize import lsq_linear
from torch import fx

from ohq_lightning.hardware import CPUTarget, set_threads
from ohq_lightning.layers import trace_layers


def graph_edges(model: torch.nn.Module, names: list[str]) -> list[tuple[int, int]]:
    """(producer, consumer) pairs of quantizable layers joined by a path through other operations only."""
    index = {name: i for i, name in enumerate(names)}
    graph = fx.symbolic_trace(model).graph
    layer_of = {node: index.get(str(node.target)) for node in graph.nodes if node.op == "call_module"}
    edges = set()
    for node in graph.nodes:
        if layer_of.get(node) is None:
            continue
        stack, seen = list(node.users), set()
        while stack:
            user = stack.pop()
            if user in seen:
                continue
            seen.add(user)
            if layer_of.get(user) is not None:
                edges.add((layer_of[node], layer_of[user]))
            else:
                stack.extend(user.users)
    return sorted(edges)


def compare(samples: dict[str, float], count: int, edges: list[tuple[int, int]], splits: int) -> dict:
    """In-sample and held-out relative errors of the fit with each set of transition pairs."""
    keys = list(samples)
    targets = np.array([samples[key] for key in keys])
    integer = np.array([[c == "1" for c in key] for key in keys], dtype=float)
    chain = [(i, i + 1) for i in range(count - 1)]
    results = {}
    for label, pairs in (("chain", chain), ("graph_edges", edges), ("both", sorted(set(chain) | set(edges)))):
        switches = np.stack([np.abs(integer[:, a] - integer[:, b]) for a, b in pairs], 1)
        rows = np.concatenate([np.ones((len(keys), 1)), integer, switches], 1)
        lower = np.concatenate([np.full(1 + count, -np.inf), np.zeros(len(pairs))])
        upper = np.full(rows.shape[1], np.inf)

        def fitted(chosen: np.ndarray, rows: np.ndarray = rows, lower: np.ndarray = lower, upper: np.ndarray = upper):
            return lsq_linear(rows[chosen], targets[chosen], bounds=(lower, upper)).x

        rng = np.random.default_rng(0)  # the same splits for every model of the transitions
        held_errors = []
        for _ in range(splits):
            order = rng.permutation(len(keys))
            held, kept = order[: len(keys) // 5], order[len(keys) // 5 :]
            held_errors.extend(np.abs(rows[held] @ fitted(kept) - targets[held]) / targets[held])
        residual = np.abs(rows @ fitted(np.arange(len(keys))) - targets) / targets
        results[label] = {
            "unknowns": int(rows.shape[1]),
            "in_sample_median": round(float(np.median(residual)), 4),
            "in_sample_max": round(float(residual.max()), 4),
            "holdout_median": round(float(np.median(held_errors)), 4),
            "holdout_p90": round(float(np.quantile(held_errors, 0.9)), 4),
            "holdout_max": round(float(np.max(held_errors)), 4),
        }
    for label in ("graph_edges", "both"):
        ratio = results[label]["holdout_median"] / results["chain"]["holdout_median"]
        results[label]["holdout_median_over_chain"] = round(ratio, 3)
    return results


def bench_model(name: str, runtime: str, threads: int, size: int, splits: int, cache_root: Path) -> dict:
    """Profile (or reuse the cache), then compare the transition models on the profile's samples."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    example = torch.randn(1, 3, size, size)
    trace = trace_layers(model, example)
    names = trace.names()
    cache_dir = cache_root / f"{name}-{runtime}-{size}-{threads}"
    target = CPUTarget(runtime=runtime, threads=threads, cache_dir=cache_dir, progress=False)
    table = target.costs(trace.layers, model=model, example_inputs=example)
    (path,) = (cache_dir / "oqa").glob("*.json")
    entries = json.loads(path.read_text())["entries"]
    samples = {key: entry["median_ms"] for key, entry in entries.items() if set(key) <= {"0", "1"}}
    if any(len(key) != len(names) for key in samples):
        raise RuntimeError(f"{path}: samples do not match the {len(names)} layers of {name}")
    edges = graph_edges(model, names)
    chain = {(i, i + 1) for i in range(len(names) - 1)}
    return {
        "runtime": table.meta.get("runtime_version"),
        "layers": len(names),
        "samples": len(samples),
        "graph_edges": len(edges),
        "graph_edges_in_forward_order": len(chain & set(edges)),
        "fits": compare(samples, len(names), edges, splits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv3_small_100"])
    parser.add_argument("--runtime", nargs="+", default=["onnxruntime", "torch"], choices=["onnxruntime", "torch"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--splits", type=int, default=40, help="random 80/20 splits for the held-out errors")
    parser.add_argument("--cache-dir", type=Path, default=None, help="reuse profiles kept here (default: fresh)")
    args = parser.parse_args()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.cache_dir or Path(scratch)
        results = {
            runtime: {
                name: bench_model(name, runtime, args.threads, args.size, args.splits, root) for name in args.models
            }
            for runtime in args.runtime
        }
    print(
        json.dumps({"bench": "oqa_transition_model", "threads": args.threads, "size": args.size, **results}, indent=1)
    )


if __name__ == "__main__":
    main()
