"""Seconds spent by each stage of the data-free search, on real timm models at 224x224.

Prints one JSON object. Each model's figures include a baseline measured in the same run: the
median time of one float forward of the synthetic batch, so that ``mqe_over_forwards`` (MQE time
/ (layers x quantized options x one forward)) and ``search_over_forward`` can be compared across
machines. Target (issue [core]): the whole ResNet-18 search under 60 s on 2 CPU cores.

    python bench/search_cost.py [--models resnet18 mobilenetv3_large_100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import timm
import torch

import ohq_lightning as ohq


def median_forward_s(model: torch.nn.Module, inputs: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of one no-grad forward of ``inputs`` (after one warm-up)."""
    model.eval()
    times = []
    with torch.no_grad():
        model(inputs)
        for _ in range(repeats):
            started = time.perf_counter()
            model(inputs)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_model(name: str, *, num_samples: int, cache_dir: str) -> dict:
    """Run one search and report its stage timings beside the forward baseline."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    example = torch.randn(1, 3, 224, 224)
    started = time.perf_counter()
    plan = ohq.search(model, example, compression_ratio=0.6, num_samples=num_samples, cache_dir=cache_dir)
    total = time.perf_counter() - started
    forward = median_forward_s(model, torch.randn(num_samples, 3, 224, 224))
    timings = plan.meta["timings_s"]
    quantized_options = sum(1 for o in plan.options if o != "fp32")
    return {
        "layers": len(plan.assignment),
        "options": plan.options,
        "seconds": {k: round(v, 3) for k, v in timings.items()} | {"total": round(total, 2)},
        "forward_s": round(forward, 4),
        "mqe_over_forwards": round(timings["sensitivity"] / (forward * len(plan.assignment) * quantized_options), 3),
        "search_over_forward": round(total / forward, 1),
        "size_ratio": round(plan.predicted["size_ratio"], 4),
        "option_counts": plan.option_counts(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv3_large_100"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache_dir:  # cold cache: distillation is part of the cost
        results = {name: bench_model(name, num_samples=args.num_samples, cache_dir=cache_dir) for name in args.models}
    report = {
        "bench": "search_cost",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "torch": torch.__version__,
        "input": [1, 3, 224, 224],
        "num_samples": args.num_samples,
        "models": results,
    }
    if "resnet18" in results:
        report["resnet18_total_over_target_60s"] = round(results["resnet18"]["seconds"]["total"] / 60.0, 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
