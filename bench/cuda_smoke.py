"""Does the `cuda` target measure real kernels on this GPU, and how well does its table add up?

For each model (random init, offline) at 1x3xSxS: profile the `cuda` target (fp32, fp16, bf16,
w8a8; energy through NVML where readable), then time the whole network eagerly in fp32 and in
fp16 and compare with what the table predicts for those uniform plans (fp32 agrees by
construction: the table's base is the fp32 network minus its layers; fp16 is the real test of the
additive model). Prints one JSON object: device, per model the implementations chosen for int8,
the layers without an int8 kernel and why, median per-layer speedups over fp32, measured vs
predicted milliseconds, energy where measured (first model only), and seconds spent. Meant to
finish in under two minutes on one GPU:

    python bench/cuda_smoke.py [--models resnet18 mobilenetv3_small_100] [--size 64]
    python bench/cuda_smoke.py --cpu-dry-run   # the same plumbing on the CPU (no GPU timing), for checking
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import json
import statistics
import tempfile
import time

import timm
import torch

from ohq_lightning.hardware import TimingSettings
from ohq_lightning.hardware.cuda import CUDATarget, DeviceInfo, Kernel, synchronized_timer
from ohq_lightning.layers import trace_layers

OPTIONS = ("fp32", "fp16", "bf16", "w8a8")
TIMING = TimingSettings(warmup=3, min_repeats=7, max_repeats=100, max_seconds=0.2, rel_spread=0.02)


def _network_ms(
    model: torch.nn.Module, example: torch.Tensor, dtype: torch.dtype, device: torch.device, timer
) -> float:
    network = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    inputs = example.to(device=device, dtype=dtype)

    def run() -> None:
        with torch.no_grad():
            network(inputs)

    return timer([Kernel("network", str(dtype), "", run)], TIMING)[0].median_ms


def bench_model(name: str, size: int, cache_dir: str, dry_run: bool, energy: bool) -> dict:
    """Profile one model on the GPU and compare uniform plans' predictions with the measured network."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    example = torch.randn(1, 3, size, size)
    layers = trace_layers(model, example).layers
    target = CUDATarget(
        options=OPTIONS, timing=TIMING, cache_dir=cache_dir, progress=False, energy=energy, energy_seconds=0.1
    )
    started = time.perf_counter()
    if dry_run:
        device = torch.device("cpu")
        timer = synchronized_timer(min_sample_ms=0.5)
        info = DeviceInfo("cpu (dry run)", (9, 0), torch.__version__, torch.version.cuda, None)
        table = target.measure_on(layers, device=device, info=info, timer=timer, model=model, example_inputs=example)
    else:
        device = torch.device("cuda", 0)
        timer = synchronized_timer(functools.partial(torch.cuda.synchronize, device), min_sample_ms=1.0)
        table = target.costs(layers, model=model, example_inputs=example)
    profile_s = time.perf_counter() - started
    names = [layer.name for layer in layers]
    measured = {
        "fp32": _network_ms(model, example, torch.float32, device, timer),
        "fp16": _network_ms(model, example, torch.float16, device, timer),
    }
    predicted = {dtype: table.predicted_latency_ms(dict.fromkeys(names, dtype)) for dtype in measured}
    int8_ok = [n for n in names if table.costs[n]["w8a8"].latency_ms is not None]
    reasons = collections.Counter(
        reason.split(" (")[0] for row in table.meta["unsupported"].values() for reason in row.values()
    )

    def ratio(option: str, over: str, among: list[str]) -> float | None:
        values = [table.costs[n][option].latency_ms / table.costs[n][over].latency_ms for n in among]
        return round(statistics.median(values), 3) if values else None

    energy = [table.costs[n]["fp32"].energy_mj for n in names if table.costs[n]["fp32"].energy_mj is not None]
    return {
        "layers": len(names),
        "profile_s": round(profile_s, 1),
        "measured_now": table.meta["measured_now"],
        "int8_layers": len(int8_ok),
        "int8_implementations": collections.Counter(
            table.meta["implementations"][n].get("int8", "none") for n in names
        ),
        "int8_unsupported_reasons": dict(reasons),
        "median_ratio_to_fp32": {
            "fp16": ratio("fp16", "fp32", names),
            "bf16": ratio("bf16", "fp32", names),
            "w8a8": ratio("w8a8", "fp32", int8_ok),
        },
        "median_int8_over_fp16": ratio("w8a8", "fp16", int8_ok),
        "transition_ms_median": round(statistics.median(table.transition_ms.values()), 4)
        if table.transition_ms
        else None,
        "base_ms": None if table.base_latency_ms is None else round(table.base_latency_ms, 3),
        "base_note": table.meta["base"].get("note"),
        "network_ms": {k: round(v, 3) for k, v in measured.items()},
        "predicted_ms": {k: round(v, 3) for k, v in predicted.items()},
        "predicted_over_measured": {k: round(predicted[k] / measured[k], 3) for k in measured},
        "energy": table.meta["energy"],
        "fp32_layer_energy_mj_sum": round(sum(energy), 4) if energy else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv3_small_100"])
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run the plumbing on the CPU, without a GPU")
    args = parser.parse_args()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --cpu-dry-run")
    device = "cpu (dry run)" if args.cpu_dry_run else DeviceInfo.of(0).to_dict()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache_dir:
        results = {  # energy readings take 0.1 s per layer and option: only for the first model
            name: bench_model(name, args.size, cache_dir, args.cpu_dry_run, energy=index == 0 and not args.cpu_dry_run)
            for index, name in enumerate(args.models)
        }
    print(
        json.dumps(
            {
                "device": device,
                "size": args.size,
                "models": results,
                "total_s": round(time.perf_counter() - started, 1),
            },
            default=str,
        )
    )


if __name__ == "__main__":
    main()
