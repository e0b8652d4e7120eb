"""Does each layer's precision matter in ONNX Runtime on this CPU, and do isolated layer timings add up?

For each model at 1x3x224x224, in ONNX Runtime (same threads, timed call by call in turn, medians over
rounds), this measures end to end: uniform FP32, uniform INT8 (u8s8 QDQ, fused), and
"int8_where_faster": INT8 only for the layers whose isolated INT8 kernel was faster than their
isolated FP32 kernel. It also reports the sum of the isolated per-layer timings beside the
whole-graph time, to show how much of a network's time isolated-layer sums miss or add.

Prints one JSON object; figures are ratios against uniform FP32 measured in the same run.

    python bench/ort_layer_precision.py [--models resnet18 mobilenetv3_small_100 mobilenetv3_large_100] [--threads 1]
"""

from __future__ import annotations

import argparse
import json

import timm
import torch

from ohq_lightning._util.timing import time_callable
from ohq_lightning.deploy import (
    DeployedModel,
    QDQBuilder,
    activation_ranges,
    export_onnx,
    layer_graph,
    measure_latency,
    ort_runner,
    ort_session,
)
from ohq_lightning.hardware import TimingSettings, set_threads
from ohq_lightning.layers import trace_layers


def bench_model(name: str, threads: int, rounds: int) -> dict:
    """End-to-end and per-layer ORT timings of one model."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    example = torch.randn(1, 3, 224, 224)
    layers = trace_layers(model, example).layers
    settings = TimingSettings(max_seconds=0.3)
    isolated = {
        layer.name: {
            k: time_callable(ort_runner(*layer_graph(layer, k), threads), settings).median_ms for k in ("fp32", "int8")
        }
        for layer in layers
    }
    faster = [n for n, t in isolated.items() if t["int8"] < t["fp32"]]
    graph = export_onnx(model, example)
    ranges = activation_ranges(graph, [layer.name for layer in layers], [torch.randn(4, 3, 224, 224)])
    builder = QDQBuilder(graph, ranges)
    plans = {
        "fp32": {},
        "int8": {layer.name: "w8a8" for layer in layers},
        "int8_where_faster": dict.fromkeys(faster, "w8a8"),
    }
    deployed = []
    for plan in plans.values():
        qdq = builder.build(plan)
        deployed.append(DeployedModel(plan, qdq, ort_session(qdq.SerializeToString(), threads), threads))
    timings = measure_latency(
        deployed, example, settings=TimingSettings(max_seconds=1.0, min_repeats=15), rounds=rounds
    )
    median = {key: timing.median_ms for key, timing in zip(plans, timings, strict=True)}
    sum_fp32 = sum(t["fp32"] for t in isolated.values())
    sum_int8 = sum(t["int8"] for t in isolated.values())
    return {
        "layers": len(layers),
        "layers_int8_faster_isolated": len(faster),
        "end_to_end_ms": {k: round(v, 3) for k, v in median.items()},
        "ratio_vs_fp32": {k: round(v / median["fp32"], 3) for k, v in median.items()},
        "int8_where_faster_over_best_uniform": round(
            median["int8_where_faster"] / min(median["fp32"], median["int8"]), 3
        ),
        "isolated_sum_ms": {"fp32": round(sum_fp32, 3), "int8": round(sum_int8, 3)},
        "isolated_sum_over_end_to_end": {
            "fp32": round(sum_fp32 / median["fp32"], 3),
            "int8": round(sum_int8 / median["int8"], 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv3_small_100", "mobilenetv3_large_100"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    set_threads(args.threads)
    import onnxruntime

    results = {name: bench_model(name, args.threads, args.rounds) for name in args.models}
    print(
        json.dumps(
            {
                "bench": "ort_layer_precision",
                "threads": args.threads,
                "onnxruntime": onnxruntime.__version__,
                "models": results,
            }
        )
    )


if __name__ == "__main__":
    main()
