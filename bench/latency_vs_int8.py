"""Is the OHQ plan faster than uniform INT8 (and than the best uniform build), measured end to end, at INT8's accuracy?

For each model (trained on the built-in digits data at its recipe's resolution), each runtime
(ONNX Runtime, torch's int8 kernels) and each thread count, this bench:

1. profiles the model at 1x3x224x224 with the measured ``cpu`` target of that runtime, cold: in a
   fresh temporary cache directory per profile (``--cache-dir DIR`` caches in DIR instead, so a
   second run reuses the measurements; ``profile.from_cache`` in the output says how many of the
   profile's timed plans came from the cache);
2. searches the plan that minimises latency with total MQE sensitivity no worse than uniform
   INT8's (``minimize="latency", sensitivity_budget="w8a8"``, options fp32/w8a8);
3. deploys uniform FP32, uniform INT8 and the plan at 224 on the runtime's real kernels and times
   them call by call in turn (3 rounds, medians);
4. deploys the same three at the training resolution (calibrated on 4 train batches, no
   fine-tuning) and measures their accuracy on the 597 test digits (once per model and runtime:
   accuracy does not depend on the thread count).

Thread counts run in separate processes (torch's thread count is set once per process). It prints
one JSON object: measured and predicted milliseconds of each build, the ratios ``ohq/int8`` and
``ohq/best_uniform``, the accuracies, and the relative prediction errors (of the milliseconds, and
of each build's time relative to FP32).

    python bench/latency_vs_int8.py [--models resnet18 ...] [--runtimes onnxruntime torch] [--threads 1 2]
        [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

RECIPES = {"mobilenetv3_small_100": "mobilenetv3_small", "mobilenetv3_large_100": "mobilenetv3", "resnet18": "resnet18"}
OPTIONS = ["fp32", "w8a8"]
DEPLOY_SIZE = 224


def recipe(name: str) -> Any:
    """The composed job config of the model's recipe (training settings and resolution)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from ohq_lightning.cli.config import register_configs

    register_configs()
    with initialize_config_module(config_module="ohq_lightning.conf", version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=[f"+recipe={RECIPES[name]}"]))


def train(name: str, weights: Path) -> dict[str, Any]:
    """Train the model on digits with its recipe's settings; save the weights; return settings and seconds."""
    import lightning.pytorch as pl

    from ohq_lightning.cli.data import build_data
    from ohq_lightning.cli.model import build_model, classifier, fit_quietly

    cfg = recipe(name)
    pl.seed_everything(cfg.seed, verbose=False)
    data = build_data("digits", image_size=cfg.data.image_size, batch_size=cfg.data.batch_size, seed=cfg.data.seed)
    module = classifier(build_model(name, num_classes=data.num_classes), cfg.train)
    seconds = fit_quietly(module, data.train_loader(), cfg.train.epochs)
    torch.save(module.model.state_dict(), weights)
    return {
        "image_size": cfg.data.image_size,
        "epochs": cfg.train.epochs,
        "optimizer": cfg.train.optimizer,
        "train_s": round(seconds, 1),
    }


def measure(
    name: str,
    weights: str,
    image_size: int,
    threads: int,
    runtimes: list[str],
    accuracy: bool,
    cache_dir: str | None = None,
) -> dict:
    """One process, one thread count: profile, search, deploy and time each runtime (and score accuracy).

    Each profile times in ``cache_dir``, or (None) in a fresh temporary directory, so it is cold.
    """
    from profile_cost import RecordingCPUTarget  # the sibling bench: a cpu target that keeps its tables

    from ohq_lightning import search
    from ohq_lightning.cli.data import build_data
    from ohq_lightning.cli.evaluate import deployed_accuracy
    from ohq_lightning.cli.model import build_model
    from ohq_lightning.deploy import deploy_plan, measure_latency
    from ohq_lightning.hardware import set_threads
    from ohq_lightning.layers import trace_layers

    set_threads(threads)
    network = build_model(name, num_classes=10, checkpoint=weights).eval()
    data = build_data("digits", image_size=image_size)
    small = [x for x, _ in islice(data.train_loader(), 4)]
    large = [F.interpolate(x[:8], size=(DEPLOY_SIZE, DEPLOY_SIZE), mode="bilinear") for x in small]
    example = large[0][:1]
    names = trace_layers(network, example).names()
    results = {}
    for runtime in runtimes:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ohq-latency-vs-int8-") as fresh:
            target = RecordingCPUTarget(runtime=runtime, threads=threads, progress=False, cache_dir=cache_dir or fresh)
            plan = search(
                network,
                example,
                target=target,
                options=OPTIONS,
                minimize="latency",
                sensitivity_budget="w8a8",
                num_samples=8,
                progress=False,
            )
        search_s = time.perf_counter() - started
        profile = target.tables[0]["fit"]  # the profile's own table: its cache use
        builds = {"fp32": dict.fromkeys(names, "fp32"), "int8": dict.fromkeys(names, "w8a8"), "ohq": plan.assignment}
        deployed = [
            deploy_plan(network, assignment, example, runtime=runtime, calibration_inputs=large, threads=threads)
            for assignment in builds.values()
        ]
        measured = dict(zip(builds, (t.median_ms for t in measure_latency(deployed, example, rounds=3)), strict=True))
        uniform = plan.meta["uniform"]
        predicted = {
            "fp32": uniform["fp32"]["latency_ms"],
            "int8": uniform["w8a8"]["latency_ms"],
            "ohq": plan.predicted["latency_ms"],
        }
        entry: dict[str, Any] = {
            "measured_ms": {k: round(v, 4) for k, v in measured.items()},
            "predicted_ms": {k: round(v, 4) for k, v in predicted.items()},
            "prediction_error": {k: round(predicted[k] / measured[k] - 1, 4) for k in measured},
            # the same for each build's time relative to FP32: what the search compares, and immune to the
            # machine slowing down between the profile and this timing (which moves every build alike)
            "ratio_prediction_error": {
                k: round((predicted[k] / predicted["fp32"]) / (measured[k] / measured["fp32"]) - 1, 4)
                for k in ("int8", "ohq")
            },
            "ohq_over_int8": round(measured["ohq"] / measured["int8"], 4),
            "ohq_over_best_uniform": round(measured["ohq"] / min(measured["fp32"], measured["int8"]), 4),
            "ohq_int8_layers": sum(option != "fp32" for option in plan.assignment.values()),
            "layers": len(names),
            "sensitivity": {"int8": uniform["w8a8"]["sensitivity"], "ohq": plan.predicted["sensitivity"]},
            "plan_measured_during_search": plan.meta["plan_measured"],
            "search_s": round(search_s, 1),
            "profile_s": round(plan.meta["timings_s"]["costs"], 1),
            "profile": {
                "cache_dir": cache_dir or "fresh temporary directory",
                "samples": profile["samples"],
                "measured_now": profile["measured_now"],
                "from_cache": profile["from_cache"],
            },
        }
        if accuracy:
            test_example = data.example_input()
            entry["accuracy"] = {
                key: round(
                    deployed_accuracy(
                        deploy_plan(network, assignment, test_example, runtime=runtime, calibration_inputs=small),
                        data.test_loader(),
                        data.num_classes,
                        desc=key,
                        progress=False,
                    ),
                    4,
                )
                for key, assignment in builds.items()
            }
        results[runtime] = entry
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--runtimes", nargs="+", default=["onnxruntime", "torch"], choices=["onnxruntime", "torch"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="cache the profiles here (a second run reuses them); default: a fresh temporary directory per profile",
    )
    parser.add_argument(
        "--child", nargs=5, metavar=("MODEL", "WEIGHTS", "SIZE", "THREADS", "ACCURACY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.child:
        name, weights, size, threads, accuracy = args.child
        result = measure(name, weights, int(size), int(threads), args.runtimes, accuracy == "1", args.cache_dir)
        print(json.dumps(result))
        return
    started = time.perf_counter()
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            weights = Path(tmp) / f"{name}.pt"
            info = train(name, weights)
            info["runs"] = {}
            for index, threads in enumerate(args.threads):
                cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
                child = subprocess.run(
                    [sys.executable, __file__, "--runtimes", *args.runtimes, *cache, "--child", name, str(weights),
                     str(info["image_size"]), str(threads), "1" if index == 0 else "0"],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                if child.returncode != 0:
                    raise SystemExit(f"{name} at {threads} threads failed:\n{child.stderr[-3000:]}")
                info["runs"][f"{threads}_threads"] = json.loads(child.stdout.strip().splitlines()[-1])
            models[name] = info
    print(
        json.dumps(
            {
                "bench": "latency_vs_int8",
                "input": f"1x3x{DEPLOY_SIZE}x{DEPLOY_SIZE} (timing); digits at the recipe's resolution (accuracy)",
                "objective": "min latency s.t. total MQE sensitivity <= uniform INT8's; options fp32/w8a8; no QAT",
                "models": models,
                "seconds_total": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
