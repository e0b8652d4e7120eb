"""Min/max or least-error activation ranges: uniform INT8 accuracy in ONNX Runtime on the digits data.

For each model, trained on digits with its Hydra recipe (as the main job trains it), uniform INT8
is deployed to ONNX Runtime twice from the same float graph and the same calibration batches (the
job's: 4 train batches of 64): once with the observed min/max activation ranges, once with the
least-squared-error clipped ranges ``deploy.activation_ranges`` now chooses. Each build is scored
on the 597 test digits and on all 1,797 (sensitivity to rounding is a property of the function, and
597 images resolve only 0.17 pt), beside FP32 in PyTorch. Ratios: each build's errors on all
images over FP32's, and least-error's errors over min/max's.

Prints one JSON object.

    python bench/activation_ranges.py [--models mobilenetv3_small_100 mobilenetv3_large_100 resnet18]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from latency_vs_int8 import RECIPES, recipe, train

from ohq_lightning.cli.data import build_data
from ohq_lightning.cli.model import build_model
from ohq_lightning.deploy import DeployedModel, QDQBuilder, activation_ranges, export_onnx, ort_session
from ohq_lightning.layers import trace_layers


def wrong(predict, loader) -> tuple[int, int]:
    """(misclassified, total) of ``predict`` (a batch of images -> logits) over ``loader``."""
    errors = total = 0
    for x, y in loader:
        errors += int((predict(x).argmax(1) != y).sum())
        total += len(y)
    return errors, total


def bench_model(name: str, workdir: Path) -> dict:
    """Train, then score FP32 and the two uniform INT8 builds."""
    weights = workdir / f"{name}.pt"
    trained = train(name, weights)
    cfg = recipe(name)
    data = build_data("digits", image_size=cfg.data.image_size, batch_size=cfg.data.batch_size, seed=cfg.data.seed)
    model = build_model(name, num_classes=data.num_classes)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    example = data.example_input()
    names = trace_layers(model, example).names()
    graph = export_onnx(model, example)
    calibration = [x for x, _ in islice(data.train_loader(), 4)]
    int8 = dict.fromkeys(names, "w8a8")
    loaders = {"test": data.test_loader(), "train": data.train_loader()}

    def float_logits(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    builds = {"fp32": float_logits}
    seconds = {}
    for label, clip in (("int8_min_max", False), ("int8_least_error", True)):
        started = time.perf_counter()
        ranges = activation_ranges(graph, names, calibration, clip=clip)
        seconds[label] = round(time.perf_counter() - started, 2)
        quantized = QDQBuilder(graph, ranges).build(int8)
        deployed = DeployedModel(int8, quantized, ort_session(quantized.SerializeToString(), 1), 1)
        builds[label] = lambda x, deployed=deployed: torch.from_numpy(
            np.concatenate([deployed(image.unsqueeze(0)) for image in x])
        )
    counts = {label: {part: wrong(fn, loader) for part, loader in loaders.items()} for label, fn in builds.items()}
    result = {**trained, "range_seconds": seconds, "builds": {}}
    for label, parts in counts.items():
        errors_all = sum(e for e, _ in parts.values())
        images_all = sum(n for _, n in parts.values())
        result["builds"][label] = {
            "test_accuracy": round(100 * (1 - parts["test"][0] / parts["test"][1]), 2),
            "all_accuracy": round(100 * (1 - errors_all / images_all), 2),
            "errors_all": errors_all,
        }
    fp32_errors = max(result["builds"]["fp32"]["errors_all"], 1)
    for label in ("int8_min_max", "int8_least_error"):
        result["builds"][label]["errors_over_fp32"] = round(result["builds"][label]["errors_all"] / fp32_errors, 3)
    result["least_error_errors_over_min_max"] = round(
        result["builds"]["int8_least_error"]["errors_all"] / max(result["builds"]["int8_min_max"]["errors_all"], 1), 3
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        models = {name: bench_model(name, Path(workdir)) for name in args.models}
    print(
        json.dumps(
            {
                "bench": "activation_ranges",
                "deployment": "uniform INT8 (u8s8 QDQ), ONNX Runtime, 1 thread, digits at the recipe's resolution",
                "calibration": "4 train batches of 64",
                "models": models,
                "seconds_total": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
