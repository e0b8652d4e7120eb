"""Is MQE right? Sensitivity quality and cost of MQE against weight-error, Hessian and random baselines.

For each model (timm, random init, trained on scikit-learn's built-in digits at its recipe's
resolution with its float-training settings, ``recipes/*.yaml``), with options w8a8 / w4a8 / w2a8:

1. **Ground truth**: for every layer x option, only that layer is fake-quantized (its input
   quantizer calibrated on 256 train images) and the model is scored on all 1,797 digits: the
   mean per-image cross-entropy increase (and accuracy drop, and the KL divergence of the outputs
   on these real images: MQE's own measure on real data) over the float model. Sensitivity is
   a property of the function, so every image counts (train and test alike). Its reliability
   ceiling: the Spearman correlation between the ground truths of two disjoint random halves of
   the images (mean over many splits), and the Spearman-Brown reliability of the full set.
2. **Providers**, each timed in this one run: MQE (the ``quantize`` reading) on 8 Gaussian
   inputs (``--mqe-samples``), MQE on 8 BN-distilled inputs (search's default), MQE on 8 real
   train images without their labels (what a user with a few unlabelled images could pass as a
   provider), MQE's ``random_mask`` reading on the distilled inputs, the weight quantization
   error, the HAWQ-style Hessian trace x weight error (Hutchinson, 100 samples by default,
   absolute traces, over 64 train images with their labels and the cross-entropy loss), and
   random scores. For each: Spearman and Kendall with the ground truth, pooled over layers x
   options and per option, the pooled Spearman's ratio to the split-half ceiling, and 95%
   bootstrap intervals (images and layers resampled together), plus the paired difference of the
   pooled Spearman against the Hessian's.
3. **Plans**: at 3, 3.5 and 4 average weight bits (compression ratio 3/8, 3.5/8, 4/8 of INT8
   size, analytical target), the plan each provider's table leads ``search`` to (the table passed
   as ``search(..., sensitivity=table)``), fake-quantized and calibrated on 4 train batches of 64
   (no fine-tuning): accuracy and cross-entropy on the 597 held-out test digits and on all 1,797,
   beside FP32, uniform w8a8 and w4a8, and the mean of several random plans (random tables with
   other seeds through the same ILP); each plan's test accuracy and all-image cross-entropy minus the
   Hessian plan's, with paired bootstrap 95% intervals (597 test images: one image is 0.17 pt).

Prints one JSON object. Seconds are wall-clock on whatever the machine gives (the development
machine's 2 cores are shared, and 2 torch threads there ran elementwise ops up to 100x slower than 1,
hence 1 thread by default): compare the ratios, measured in the same run. Models and images are
kept channels-last (MobileNetV3's depthwise convolutions ran 4x faster so; outputs equal within
2e-9). The default run takes about 20 minutes there; ``--quick`` (1 epoch, 400 ground-truth
images, 5 Hessian samples) is a smoke test whose figures mean nothing.

    python bench/sensitivity_quality.py [--models resnet18 mobilenetv3_small_100] [--quick] [--threads 1]
        [--hessian-iterations 100] [--hessian-images 64] [--bootstrap 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import timm
import torch
import torch.nn.functional as F
import yaml
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ohq_lightning.cli.config import TrainConfig
from ohq_lightning.cli.data import digits_split
from ohq_lightning.cli.model import Classifier, fit_quietly
from ohq_lightning.layers import trace_layers
from ohq_lightning.pipeline import search
from ohq_lightning.plan import SensitivityTable
from ohq_lightning.quant import apply_plan, calibrate, strip_plan
from ohq_lightning.sensitivity import (
    distilled_inputs,
    gaussian_inputs,
    hessian_sensitivity,
    mqe_sensitivity,
    random_sensitivity,
    weight_error_sensitivity,
)

OPTIONS = ("w8a8", "w4a8", "w2a8")
BUDGET_BITS = (3.0, 3.5, 4.0)
PROVIDERS = ("mqe_gaussian", "mqe_distilled", "mqe_real", "mqe_random_mask", "weight_error", "hessian", "random")
#: The MQE the targets are checked for: search's default (quantize reading, distilled inputs).
MQE_DEFAULT = "mqe_distilled"
RECIPES = {"resnet18": "resnet18.yaml", "mobilenetv3_small_100": "mobilenetv3_small.yaml"}
ROOT = Path(__file__).resolve().parent.parent
_STARTED = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr, with the seconds since the start."""
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def recipe(model_name: str) -> dict[str, Any]:
    """Image size and float-training settings of the model's recipe (``recipes/*.yaml``; the job's defaults else)."""
    config = yaml.safe_load((ROOT / "recipes" / RECIPES[model_name]).read_text())
    defaults = TrainConfig()
    train_cfg = config.get("train", {})
    return {
        "image_size": config["data"]["image_size"],
        **{key: train_cfg.get(key, getattr(defaults, key)) for key in ("epochs", "lr", "weight_decay", "optimizer")},
    }


def train(
    model_name: str,
    data: dict[str, torch.Tensor],
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    optimizer: str,
    seed: int,
) -> tuple[nn.Module, float]:
    """A timm model (random init) trained on the digits' train split; returns it in eval mode and the seconds."""
    pl.seed_everything(seed, verbose=False)
    network = timm.create_model(model_name, pretrained=False, num_classes=10, in_chans=3)
    network = network.to(memory_format=torch.channels_last)  # depthwise convs run ~4x faster so on this CPU
    module = Classifier(network, lr=lr, epochs=epochs, weight_decay=weight_decay, optimizer=optimizer)
    loader = DataLoader(
        TensorDataset(data["x_train"], data["y_train"]),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    seconds = fit_quietly(module, loader, epochs)
    return network.eval(), seconds


@torch.no_grad()
def per_image(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 600
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Per-image cross-entropy (float64), correctness and log-probabilities of ``model`` in eval mode."""
    model.eval()
    losses, correct, log_probs = [], [], []
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        logits = model(x).double()
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        correct.append(logits.argmax(1) == y)
        log_probs.append(F.log_softmax(logits, dim=1))
    return torch.cat(losses).numpy(), torch.cat(correct).numpy(), torch.cat(log_probs)


def ground_truth(
    model: nn.Module, names: list[str], images: torch.Tensor, labels: torch.Tensor, calibration: list[torch.Tensor]
) -> dict[str, Any]:
    """Per-image CE increase, correctness change and KL(fp || quantized) of quantizing each layer alone.

    Each is an array ``[layer, option, image]``.
    """
    fp_loss, fp_correct, fp_log_probs = per_image(model, images, labels)
    delta_ce = np.zeros((len(names), len(OPTIONS), len(labels)))
    kl = np.zeros((len(names), len(OPTIONS), len(labels)))
    delta_wrong = np.zeros((len(names), len(OPTIONS), len(labels)), dtype=np.int8)
    for i, name in enumerate(names):
        state = None
        for j, option in enumerate(OPTIONS):
            layer = apply_plan(model, {name: option}).get_submodule(name)
            try:
                if state is None:  # the layer's input does not depend on its own weights: calibrate once per layer
                    calibrate(model, calibration, progress=False)
                    state = copy.deepcopy(layer.input_quantizer.state_dict())
                else:
                    layer.input_quantizer.load_state_dict(state)
                loss, correct, log_probs = per_image(model, images, labels)
            finally:
                strip_plan(model, [name])
            delta_ce[i, j] = loss - fp_loss
            kl[i, j] = (fp_log_probs.exp() * (fp_log_probs - log_probs)).sum(1).numpy()
            delta_wrong[i, j] = fp_correct.astype(np.int8) - correct.astype(np.int8)
    return {"fp_loss": fp_loss, "fp_correct": fp_correct, "delta_ce": delta_ce, "delta_wrong": delta_wrong, "kl": kl}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two flat arrays (nan when either is constant)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two flat arrays (nan when either is constant)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.kendalltau(a, b).statistic)


def correlations(scores: np.ndarray, truth: np.ndarray, fn: Any) -> dict[str, float]:
    """``fn`` of provider scores and ground truth (``[layer, option]``), pooled and per option."""
    found = {"pooled": fn(scores.ravel(), truth.ravel())}
    for j, option in enumerate(OPTIONS):
        found[option] = fn(scores[:, j], truth[:, j])
    return found


def split_half(delta_ce: np.ndarray, splits: int, rng: np.random.Generator) -> dict[str, Any]:
    """Spearman between the ground truths of two disjoint random halves of the images (pooled and per option)."""
    n = delta_ce.shape[2]
    found: dict[str, list[float]] = {"pooled": [], **{option: [] for option in OPTIONS}}
    for _ in range(splits):
        order = rng.permutation(n)
        first, second = delta_ce[:, :, order[: n // 2]].mean(2), delta_ce[:, :, order[n // 2 :]].mean(2)
        for key, value in correlations(first, second, spearman).items():
            found[key].append(value)
    result: dict[str, Any] = {}
    for key, values in found.items():
        r = float(np.nanmean(values))
        result[key] = {
            "split_half_spearman": round(r, 4),
            "sd_over_splits": round(float(np.nanstd(values)), 4),
            "spearman_brown_full_set": round(2 * r / (1 + r), 4) if r > -1 else None,
        }
    return result


def bootstrap(
    tables: dict[str, np.ndarray], delta_ce: np.ndarray, reps: int, rng: np.random.Generator
) -> dict[str, dict[str, list[float]]]:
    """Bootstrap replicates of every provider's correlations (images and layers resampled together)."""
    layers, _, n = delta_ce.shape
    found: dict[str, dict[str, list[float]]] = {
        name: {f"{fn}_{key}": [] for fn in ("spearman", "kendall") for key in ("pooled", *OPTIONS)} for name in tables
    }
    for name in tables:
        found[name]["spearman_pooled_minus_hessian"] = []
    for _ in range(reps):
        images = rng.integers(0, n, n)
        rows = rng.integers(0, layers, layers)
        truth = delta_ce[:, :, images].mean(2)[rows]
        pooled: dict[str, float] = {}
        for name, scores in tables.items():
            for fn_name, fn in (("spearman", spearman), ("kendall", kendall)):
                for key, value in correlations(scores[rows], truth, fn).items():
                    found[name][f"{fn_name}_{key}"].append(value)
            pooled[name] = found[name]["spearman_pooled"][-1]
        for name in tables:
            found[name]["spearman_pooled_minus_hessian"].append(pooled[name] - pooled.get("hessian", float("nan")))
    return found


def interval(values: list[float]) -> list[float] | None:
    """The 2.5 and 97.5 percentiles (ignoring nan), rounded."""
    array = np.asarray(values, dtype=float)
    array = array[np.isfinite(array)]
    if not len(array):
        return None
    low, high = np.percentile(array, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


def table_array(table: SensitivityTable, names: list[str]) -> np.ndarray:
    """A provider's scores as ``[layer, option]``."""
    return np.array([[table.scores[name][option] for option in OPTIONS] for name in names], dtype=float)


def providers(
    model: nn.Module,
    layers: list,
    example: torch.Tensor,
    hessian_batches: list[tuple[torch.Tensor, torch.Tensor]],
    real_images: torch.Tensor,
    *,
    hessian_iterations: int,
    mqe_samples: int,
    distill_steps: int,
    seed: int,
) -> tuple[dict[str, SensitivityTable], dict[str, float], dict[str, Any]]:
    """Every provider's table, its seconds (synthetic inputs included), and its settings."""
    tables: dict[str, SensitivityTable] = {}
    seconds: dict[str, float] = {}
    settings: dict[str, Any] = {}

    started = time.perf_counter()
    inputs = gaussian_inputs(example, mqe_samples, seed=seed)
    tables["mqe_gaussian"] = mqe_sensitivity(model, inputs, layers, OPTIONS, seed=seed, progress=False)
    seconds["mqe_gaussian"] = time.perf_counter() - started
    settings["mqe_gaussian"] = {"inputs": f"{mqe_samples} Gaussian", "method": "quantize"}

    started = time.perf_counter()
    distilled = distilled_inputs(
        model, example, mqe_samples, steps=distill_steps, seed=seed, cache_dir=False, progress=False
    )
    distill_s = time.perf_counter() - started
    tables["mqe_distilled"] = mqe_sensitivity(model, distilled, layers, OPTIONS, seed=seed, progress=False)
    seconds["mqe_distilled"] = time.perf_counter() - started
    settings["mqe_distilled"] = {
        "inputs": f"{mqe_samples} BN-distilled ({distill_steps} Adam steps)",
        "method": "quantize",
    }

    started = time.perf_counter()
    tables["mqe_real"] = mqe_sensitivity(model, real_images, layers, OPTIONS, seed=seed, progress=False)
    seconds["mqe_real"] = time.perf_counter() - started
    settings["mqe_real"] = {"inputs": f"{len(real_images)} real train images, no labels", "method": "quantize"}

    started = time.perf_counter()
    tables["mqe_random_mask"] = mqe_sensitivity(
        model, distilled, layers, OPTIONS, method="random_mask", seed=seed, progress=False
    )
    seconds["mqe_random_mask"] = time.perf_counter() - started + distill_s
    settings["mqe_random_mask"] = {
        "inputs": f"the same {mqe_samples} BN-distilled (their distillation seconds counted)",
        "method": "random_mask",
        "mask_fractions": tables["mqe_random_mask"].meta["mask_fractions"],
    }

    started = time.perf_counter()
    tables["weight_error"] = weight_error_sensitivity(model, layers, OPTIONS)
    seconds["weight_error"] = time.perf_counter() - started
    settings["weight_error"] = {"score": "sum of squared weight quantization error"}

    started = time.perf_counter()
    hessian = hessian_sensitivity(
        model, hessian_batches, layers, OPTIONS, iterations=hessian_iterations, trace="abs", seed=seed, progress=False
    )
    seconds["hessian"] = time.perf_counter() - started
    tables["hessian"] = hessian
    trace = hessian.meta["trace"]
    stderr = hessian.meta["trace_stderr"]
    relative = [stderr[name] / abs(trace[name]) for name in trace if trace[name] != 0]
    settings["hessian"] = {
        "iterations": hessian_iterations,
        "train_images": hessian.meta["num_inputs"],
        "loss": "cross-entropy on the train labels",
        "train_loss_at_those_images": round(hessian.meta["loss"], 5),
        "trace_mode": "abs",
        "negative_trace_layers": len(hessian.meta["negative_trace_layers"]),
        "layers": len(trace),
        "median_relative_stderr_of_trace": round(float(np.median(relative)), 3) if relative else None,
        "hardsigmoid_swapped": hessian.meta["hardsigmoid_swapped"],
    }
    raw_signs = np.array([trace[layer.name] for layer in layers])
    settings["hessian"]["_raw_trace_per_weight"] = raw_signs / np.array(
        [model.get_submodule(layer.name).weight.numel() for layer in layers]
    )

    started = time.perf_counter()
    tables["random"] = random_sensitivity(layers, OPTIONS, seed=seed)
    seconds["random"] = time.perf_counter() - started
    settings["random"] = {"seed": seed, "monotone": True}
    log("  seconds: " + ", ".join(f"{name} {value:.1f}" for name, value in seconds.items()))
    return tables, seconds, settings


_EVALUATED: dict[tuple, dict[str, float]] = {}
_PER_IMAGE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _plan_key(model: nn.Module, assignment: dict[str, str]) -> tuple:
    return (id(model), tuple(sorted(assignment.items())))


def evaluate_plan(
    model: nn.Module,
    assignment: dict[str, str],
    data: dict[str, torch.Tensor],
    calibration: list[torch.Tensor],
) -> dict[str, float]:
    """Accuracy (%) and mean cross-entropy of a copy of ``model`` with the plan applied and calibrated.

    A plan already evaluated on this model is not evaluated again (the figures are deterministic).
    """
    key = _plan_key(model, assignment)
    if key not in _EVALUATED:
        quantized = copy.deepcopy(model)
        apply_plan(quantized, assignment)
        calibrate(quantized, calibration, progress=False)
        _EVALUATED[key] = score(quantized, data, keep=key)
    return dict(_EVALUATED[key])


def score(model: nn.Module, data: dict[str, torch.Tensor], keep: tuple | None = None) -> dict[str, float]:
    """Test-split and all-image accuracy (%) and cross-entropy (the test images are the last of all).

    With ``keep``, the per-image losses and correctness are kept under that key for paired comparisons.
    """
    loss, correct, _ = per_image(model, data["x_all"], data["y_all"])
    if keep is not None:
        _PER_IMAGE[keep] = (loss, correct)
    test = len(data["y_test"])
    test_loss, test_correct = loss[-test:], correct[-test:]
    return {
        "test_accuracy": round(100 * float(test_correct.mean()), 2),
        "test_ce": round(float(test_loss.mean()), 4),
        "all_accuracy": round(100 * float(correct.mean()), 2),
        "all_ce": round(float(loss.mean()), 4),
    }


def plans(
    model: nn.Module,
    example: torch.Tensor,
    tables: dict[str, SensitivityTable],
    data: dict[str, torch.Tensor],
    calibration: list[torch.Tensor],
    *,
    random_plans: int,
    seed: int,
) -> dict[str, Any]:
    """Each provider's plan at each budget, evaluated; with FP32, the uniform plans and random plans."""
    names = trace_layers(model, example).names()
    _EVALUATED.clear()  # keyed by id(model): only this model's plans
    _PER_IMAGE.clear()
    rng = np.random.default_rng(seed)
    tests = len(data["y_test"])
    result: dict[str, Any] = {
        "fp32": score(model, data),
        "uniform_w8a8": evaluate_plan(model, dict.fromkeys(names, "w8a8"), data, calibration),
        "uniform_w4a8": evaluate_plan(model, dict.fromkeys(names, "w4a8"), data, calibration),
        "budgets": [],
    }
    random_tables = {s: random_sensitivity(names, OPTIONS, seed=s) for s in range(seed, seed + random_plans)}
    for bits in BUDGET_BITS:
        ratio = bits / 8
        entry: dict[str, Any] = {"avg_weight_bits": bits, "compression_ratio": ratio, "plans": {}}
        keys = {}
        for name, table in tables.items():
            plan = search(
                model, example, compression_ratio=ratio, options=list(OPTIONS), sensitivity=table, progress=False
            )
            entry["plans"][name] = {
                **evaluate_plan(model, plan.assignment, data, calibration),
                "option_counts": plan.option_counts(),
                "size_ratio": round(plan.predicted["size_ratio"], 4),
            }
            keys[name] = _plan_key(model, plan.assignment)
        for name in tables:
            if name != "hessian":
                entry["plans"][name]["minus_hessian"] = paired_difference(
                    _PER_IMAGE[keys[name]], _PER_IMAGE[keys["hessian"]], tests, rng
                )
        randoms = []
        for table in random_tables.values():
            plan = search(
                model, example, compression_ratio=ratio, options=list(OPTIONS), sensitivity=table, progress=False
            )
            randoms.append(evaluate_plan(model, plan.assignment, data, calibration))
        entry["random_plans"] = {
            "n": len(randoms),
            "seeds": list(random_tables),
            **{
                f"{key}_{stat}": round(float(fn([r[key] for r in randoms])), 4)
                for key in randoms[0]
                for stat, fn in (("mean", np.mean), ("sd", np.std))
            },
        }
        entry["uniform_w4a8_allowed"] = ratio >= 0.5
        log(f"  budget {bits} bits: {len(_EVALUATED)} distinct plans evaluated so far")
        result["budgets"].append(entry)
    return result


def paired_difference(
    plan: tuple[np.ndarray, np.ndarray],
    other: tuple[np.ndarray, np.ndarray],
    tests: int,
    rng: np.random.Generator,
    reps: int = 2000,
) -> dict[str, Any]:
    """Test accuracy (pt) and all-image cross-entropy of ``plan`` minus ``other``, with paired bootstrap 95% CIs."""
    (loss, correct), (other_loss, other_correct) = plan, other
    correct_diff = (correct[-tests:].astype(float) - other_correct[-tests:].astype(float)) * 100
    loss_diff = loss - other_loss
    test_draws = rng.integers(0, tests, (reps, tests))
    all_draws = rng.integers(0, len(loss_diff), (reps, len(loss_diff)))
    return {
        "test_accuracy_pt": {
            "value": round(float(correct_diff.mean()), 2),
            "ci95": interval(correct_diff[test_draws].mean(1).tolist()),
        },
        "all_ce": {"value": round(float(loss_diff.mean()), 4), "ci95": interval(loss_diff[all_draws].mean(1).tolist())},
    }


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for the default MQE (distilled inputs, quantize reading), measured."""
    mqe = result["providers"][MQE_DEFAULT]
    hessian = result["providers"]["hessian"]
    ceiling = result["ground_truth"]["ceiling"]["pooled"]["split_half_spearman"]
    rho = mqe["spearman"]["pooled"]["value"]
    found: dict[str, Any] = {
        "mqe": MQE_DEFAULT,
        "spearman_ge_0.9_ceiling": {"mqe": rho, "0.9_x_ceiling": round(0.9 * ceiling, 4), "met": rho >= 0.9 * ceiling},
        "spearman_ge_hessian": {
            "mqe": rho,
            "hessian": hessian["spearman"]["pooled"]["value"],
            "met": rho >= hessian["spearman"]["pooled"]["value"],
        },
        "hessian_seconds_over_mqe_ge_10": {
            "ratio": round(hessian["seconds"] / mqe["seconds"], 2),
            "met": hessian["seconds"] >= 10 * mqe["seconds"],
        },
        "plans": [],
    }
    fp32 = result["plans"]["fp32"]["test_accuracy"]
    w4 = result["plans"]["uniform_w4a8"]["test_accuracy"]
    for budget in result["plans"]["budgets"]:
        plans_at = budget["plans"]
        acc = plans_at[MQE_DEFAULT]["test_accuracy"]
        row = {
            "avg_weight_bits": budget["avg_weight_bits"],
            "mqe_test_accuracy": acc,
            "within_0.5pt_of_fp32": acc >= fp32 - 0.5,
            "ge_hessian": acc >= plans_at["hessian"]["test_accuracy"],
            "minus_hessian_test_accuracy_pt_ci95": plans_at[MQE_DEFAULT]["minus_hessian"]["test_accuracy_pt"]["ci95"],
            "ge_random_mean": acc >= budget["random_plans"]["test_accuracy_mean"],
            "ge_random_provider_plan": acc >= plans_at["random"]["test_accuracy"],
        }
        if budget["uniform_w4a8_allowed"]:
            row["ge_uniform_w4a8"] = acc >= w4
        found["plans"].append(row)
    return found


def bench_model(
    model_name: str,
    *,
    quick: bool,
    seed: int,
    hessian_iterations: int,
    mqe_samples: int,
    distill_steps: int,
    hessian_images: int,
    bootstrap_reps: int,
    splits: int,
    random_plans: int,
) -> dict[str, Any]:
    """Everything above for one model."""
    settings = recipe(model_name)
    epochs = 1 if quick else settings["epochs"]
    split = {
        key: value.contiguous(memory_format=torch.channels_last) if value.dim() == 4 else value
        for key, value in digits_split(seed, settings["image_size"]).items()
    }
    data = {
        **split,
        "x_all": torch.cat([split["x_train"], split["x_test"]]).contiguous(memory_format=torch.channels_last),
        "y_all": torch.cat([split["y_train"], split["y_test"]]),
    }
    log(f"{model_name}: training {epochs} epochs")
    model, train_s = train(
        model_name,
        split,
        epochs=epochs,
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        optimizer=settings["optimizer"],
        seed=seed,
    )
    log(f"{model_name}: ground truth")
    example = split["x_test"][:1]
    layers = trace_layers(model, example).layers
    names = [layer.name for layer in layers]
    calibration = list(split["x_train"][:256].split(64))
    rng = np.random.default_rng(seed)

    started = time.perf_counter()
    truth_images = slice(-400, None) if quick else slice(None)  # the test images come last
    truth_raw = ground_truth(model, names, data["x_all"][truth_images], data["y_all"][truth_images], calibration)
    truth_s = time.perf_counter() - started
    delta_ce = truth_raw["delta_ce"]
    truth = delta_ce.mean(2)
    acc_drop = 100 * truth_raw["delta_wrong"].mean(2)
    real_kl = truth_raw["kl"].mean(2)

    log(f"{model_name}: providers")
    hessian_batches = [(split["x_train"][:hessian_images], split["y_train"][:hessian_images])]
    tables, seconds, provider_settings = providers(
        model,
        layers,
        example,
        hessian_batches,
        split["x_train"][-mqe_samples:],
        hessian_iterations=hessian_iterations,
        mqe_samples=mqe_samples,
        distill_steps=distill_steps,
        seed=seed,
    )
    raw_trace = provider_settings["hessian"].pop("_raw_trace_per_weight")
    arrays = {name: table_array(tables[name], names) for name in PROVIDERS}
    log(f"{model_name}: correlations")
    ceiling = split_half(delta_ce, splits, rng)
    ceiling_pooled = ceiling["pooled"]["split_half_spearman"]
    boot = bootstrap(arrays, delta_ce, bootstrap_reps, rng)

    provider_results: dict[str, Any] = {}
    for name in PROVIDERS:
        rho = correlations(arrays[name], truth, spearman)
        tau = correlations(arrays[name], truth, kendall)
        found: dict[str, Any] = {
            "seconds": round(seconds[name], 3),
            "settings": provider_settings[name],
            "spearman": {
                key: {"value": round(value, 4), "ci95": interval(boot[name][f"spearman_{key}"])}
                for key, value in rho.items()
            },
            "kendall": {
                key: {"value": round(value, 4), "ci95": interval(boot[name][f"kendall_{key}"])}
                for key, value in tau.items()
            },
            "ratio_to_ceiling": {
                "value": round(rho["pooled"] / ceiling_pooled, 4),
                "ci95": [round(v / ceiling_pooled, 4) for v in (interval(boot[name]["spearman_pooled"]) or [])],
            },
            "spearman_vs_accuracy_drop_pooled": round(spearman(arrays[name].ravel(), acc_drop.ravel()), 4),
            "spearman_vs_real_data_kl_pooled": round(spearman(arrays[name].ravel(), real_kl.ravel()), 4),
        }
        if name != "hessian":
            diffs = boot[name]["spearman_pooled_minus_hessian"]
            found["spearman_pooled_minus_hessian"] = {
                "value": round(rho["pooled"] - spearman(arrays["hessian"].ravel(), truth.ravel()), 4),
                "ci95": interval(diffs),
            }
        provider_results[name] = found
    signed = np.repeat(raw_trace[:, None], len(OPTIONS), axis=1) * arrays["weight_error"]
    provider_results["hessian"]["spearman_pooled_with_signed_traces"] = round(
        spearman(signed.ravel(), truth.ravel()), 4
    )
    mqe_s = seconds[MQE_DEFAULT]
    log(f"{model_name}: plans")

    result: dict[str, Any] = {
        "model": model_name,
        "image_size": settings["image_size"],
        "layers": len(names),
        "train": {
            "epochs": epochs,
            "lr": settings["lr"],
            "optimizer": settings["optimizer"],
            "weight_decay": settings["weight_decay"],
            "seconds": round(train_s, 1),
            "train_images": len(split["y_train"]),
        },
        "ground_truth": {
            "images": int(truth_raw["delta_ce"].shape[2]),
            "score": "mean per-image cross-entropy increase when only that layer is quantized (input calibrated "
            "on 256 train images)",
            "seconds": round(truth_s, 1),
            "real_data_kl": {
                option: {"median": float(f"{np.median(real_kl[:, j]):.3g}"), "max": float(f"{real_kl[:, j].max():.3g}")}
                for j, option in enumerate(OPTIONS)
            },
            "fp32_ce": round(float(truth_raw["fp_loss"].mean()), 4),
            "fp32_accuracy": round(100 * float(truth_raw["fp_correct"].mean()), 2),
            "ce_increase": {
                option: {
                    "min": float(f"{truth[:, j].min():.3g}"),
                    "median": float(f"{np.median(truth[:, j]):.3g}"),
                    "max": float(f"{truth[:, j].max():.3g}"),
                }
                for j, option in enumerate(OPTIONS)
            },
            "accuracy_drop_pt": {
                option: {
                    "median": round(float(np.median(acc_drop[:, j])), 3),
                    "max": round(float(acc_drop[:, j].max()), 3),
                }
                for j, option in enumerate(OPTIONS)
            },
            "ceiling": {"splits": splits, **ceiling},
        },
        "providers": provider_results,
        "seconds_over_mqe_distilled": {name: round(seconds[name] / mqe_s, 3) for name in PROVIDERS},
        "plans": plans(model, example, tables, data, calibration, random_plans=random_plans, seed=seed),
    }
    result["targets"] = targets(result)
    return result


def finite(value: Any) -> Any:
    """``value`` with every nan or infinite float replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 epoch, 400 images, few samples")
    parser.add_argument("--hessian-iterations", type=int, default=None, help="Hutchinson samples (default 100)")
    parser.add_argument("--hessian-images", type=int, default=64, help="train images the Hessian is taken over")
    parser.add_argument("--mqe-samples", type=int, default=8, help="synthetic inputs of the MQE providers (8)")
    parser.add_argument("--distill-steps", type=int, default=20, help="Adam steps of the distilled inputs (20)")
    parser.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: shared cores make 2 erratic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    quick = args.quick
    iterations = args.hessian_iterations or (5 if quick else 100)
    reps = args.bootstrap or (50 if quick else 500)
    started = time.perf_counter()
    models = [
        bench_model(
            name,
            quick=quick,
            seed=args.seed,
            hessian_iterations=iterations,
            mqe_samples=args.mqe_samples,
            distill_steps=args.distill_steps,
            hessian_images=args.hessian_images,
            bootstrap_reps=reps,
            splits=10 if quick else 50,
            random_plans=2 if quick else 5,
        )
        for name in args.models
    ]
    result = {
        "bench": "sensitivity_quality",
        "settings": {
            "options": list(OPTIONS),
            "budgets_avg_weight_bits": list(BUDGET_BITS),
            "target": "analytical",
            "quick": quick,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "bootstrap_reps": reps,
            "hessian_iterations": iterations,
            "hessian_images": args.hessian_images,
            "mqe_samples": args.mqe_samples,
            "distill_steps": args.distill_steps,
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "models": models,
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(finite(result), indent=1, allow_nan=False))


if __name__ == "__main__":
    main()
