"""Is the OHQ plan faster than uniform INT8 and FP32 on this CPU, at no more estimated accuracy loss than INT8?

For each model at 1x3x224x224 in ONNX Runtime (1 thread by default): profile the `cpu` target,
score the layers with MQE, and pick the plan that minimises latency with total MQE sensitivity no
worse than uniform INT8's (the search times the plan it picks and refits until the pick was
measured). Then deploy uniform FP32, uniform INT8 and the plan, time them call by call in turn,
and print one JSON object with measured and predicted milliseconds and the ratios `ohq/int8` and
`ohq/best_uniform`. Accuracy on real data is not measured here (random-init models: see the
[deploy] bench); MQE sensitivity stands in for it.

    python bench/ohq_plan_latency.py [--models mobilenetv3_small_100 ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import timm
import torch

import ohq_lightning as ohq
from ohq_lightning.deploy import convert, measure_latency, uniform
from ohq_lightning.hardware import set_threads

OPTIONS = ["fp32", "w8a8"]


def bench_model(name: str, threads: int, cache_dir: str) -> dict:
    """Profile, search and deploy one model; compare the plan with the uniform baselines."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    example = torch.randn(1, 3, 224, 224)
    target = ohq.CPUTarget(threads=threads, cache_dir=cache_dir, progress=False)
    common = {"target": target, "options": OPTIONS, "num_samples": 8, "progress": False, "cache_dir": cache_dir}
    scored = ohq.search(model, example, compression_ratio=1.0, refine_rounds=0, **common)
    int8_sensitivity = sum(row["scores"]["w8a8"] for row in scored.layers)
    plan = ohq.search(model, example, minimize="latency", sensitivity_budget=int8_sensitivity, **common)
    calibration = [torch.randn(1, 3, 224, 224) for _ in range(4)]
    deployed = [
        uniform(model, "fp32", example, threads=threads),
        uniform(model, "w8a8", example, calibration_inputs=calibration, threads=threads),
        convert(model, plan, example, calibration_inputs=calibration, threads=threads),
    ]
    fp32_ms, int8_ms, ohq_ms = (t.median_ms for t in measure_latency(deployed, example, rounds=3))
    layers = ohq.trace_layers(model, example).layers
    table = target.costs_with_plans(layers, OPTIONS, model=model, example_inputs=example, plans=[plan.assignment])
    predicted = {"fp32": table.predicted_latency_ms(deployed[0].assignment)}
    predicted["int8"] = table.predicted_latency_ms(deployed[1].assignment)
    predicted["ohq"] = plan.predicted["latency_ms"]  # what the search predicted for the plan it returned
    return {
        "layers": len(plan.assignment),
        "ohq_int8_layers": sum(o != "fp32" for o in plan.assignment.values()),
        "plan_measured_during_search": plan.meta["plan_measured"],
        "sensitivity": {"int8": int8_sensitivity, "ohq": plan.predicted["sensitivity"]},
        "measured_ms": {"fp32": round(fp32_ms, 3), "int8": round(int8_ms, 3), "ohq": round(ohq_ms, 3)},
        "predicted_ms": {k: round(v, 3) for k, v in predicted.items()},
        "ohq_over_int8": round(ohq_ms / int8_ms, 3),
        "ohq_over_best_uniform": round(ohq_ms / min(fp32_ms, int8_ms), 3),
        "search_s": {k: round(v, 1) for k, v in plan.meta["timings_s"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv3_small_100", "mobilenetv3_large_100", "resnet18"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache_dir:
        results = {name: bench_model(name, args.threads, cache_dir) for name in args.models}
    print(
        json.dumps({"bench": "ohq_plan_latency", "runtime": "onnxruntime", "threads": args.threads, "models": results})
    )


if __name__ == "__main__":
    main()
