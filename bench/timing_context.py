"""Timing context: how a deployed graph's milliseconds depend on what runs between its calls.

The same ONNX Runtime sessions (uniform FP32, uniform INT8 and a half-INT8 mix of a timm model, random
init, batch 1) are timed alone (back to back), in turn with one other graph (the cpu target's profile
and anchor), in turn with two others (``deploy.measure_latency`` of FP32, INT8 and a plan, as the Hydra
job and the benches measure), and in turn in blocks of ``n`` calls with the first of each block dropped.
Each setting is timed for ``--seconds`` in every one of ``--repeats`` rounds; the JSON gives the median
milliseconds per graph per round, and each setting's FP32 median over the alone figure (the ratio that
says how far an interleaved millisecond is from a deployed one).

    python bench/timing_context.py [--model mobilenetv3_large_100] [--size 224] [--seconds 1.5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import timm
import torch

from ohq_lightning.deploy import deploy_plan, deploy_uniform
from ohq_lightning.hardware import set_threads
from ohq_lightning.layers import trace_layers


def rotation(fns: Sequence[Callable[[], object]], block: int, seconds: float) -> list[float]:
    """Median ms of each callable, run in turn (``block`` calls a turn, the first untimed when ``block`` > 1)."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
        fn()
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for fn, samples in zip(fns, times, strict=True):
            if block > 1:
                fn()
            for _ in range(max(block - 1, 1)):
                begin = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - begin)
    return [round(statistics.median(samples) * 1e3, 4) for samples in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv3_large_100")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    set_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    example = torch.randn(1, 3, args.size, args.size)
    names = [layer.name for layer in trace_layers(model, example).layers]
    common = {"runtime": "onnxruntime", "calibration_inputs": [torch.randn(2, 3, args.size, args.size)], "threads": 1}
    fp32 = deploy_uniform(model, "fp32", example, **common).runner(example)
    int8 = deploy_uniform(model, "w8a8", example, **common).runner(example)
    half = {name: "w8a8" if index % 2 else "fp32" for index, name in enumerate(names)}
    mix = deploy_plan(model, half, example, **common).runner(example)
    settings = {
        "alone": ([fp32], 1),
        "in turn with one other": ([fp32, int8], 1),
        "in turn with two others": ([fp32, int8, mix], 1),
        "two others, blocks of 3": ([fp32, int8, mix], 3),
        "two others, blocks of 12": ([fp32, int8, mix], 12),
    }
    rounds: dict[str, list[list[float]]] = {label: [] for label in settings}
    for _ in range(args.repeats):  # rounds interleave the settings, so a drift of the machine hits all
        for label, (fns, block) in settings.items():
            rounds[label].append(rotation(fns, block, args.seconds))
    alone = statistics.median(run[0] for run in rounds["alone"])
    report = {
        "bench": "timing_context",
        "model": args.model,
        "input": [1, 3, args.size, args.size],
        "threads": 1,
        "graphs": ["fp32", "int8", "half-int8 mix"],
        "median_ms_per_round": rounds,
        "fp32_over_alone": {
            label: round(statistics.median(run[0] for run in runs) / alone, 4) for label, runs in rounds.items()
        },
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
