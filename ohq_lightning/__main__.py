"""``python -m ohq_lightning``: search a plan for a timm model and print it.

An interim command line until the Hydra app lands: it runs the data-free search on a
randomly initialised timm model (offline; no weights are downloaded) and prints the per-layer
plan, or writes it as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ohq_lightning", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv3_large_100", help="timm model name (random init, offline)")
    parser.add_argument("--input-size", type=int, default=224, help="input height and width")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument(
        "--target",
        default="analytical",
        choices=["analytical", "cpu", "generic_cpu", "bit_serial_accel"],
        help="hardware target: analytical estimates, or 'cpu' to measure this CPU in ONNX Runtime (minutes)",
    )
    parser.add_argument("--compression-ratio", type=float, default=0.6, help="plan weight bytes / INT8 weight bytes")
    parser.add_argument("--latency-budget", type=float, default=None, help="ms, on the target's latency model")
    parser.add_argument("--options", default=None, help="comma-separated candidate options (default: the target's)")
    parser.add_argument("--sensitivity", default="quantize", choices=["quantize", "random_mask"])
    parser.add_argument("--synthetic", default="distilled", choices=["distilled", "gaussian"])
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the plan as JSON to this path")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the search and print the plan; returns the process exit code."""
    args = _parser().parse_args(argv)
    import timm
    import torch

    from ohq_lightning.api import search
    from ohq_lightning.report import format_plan_table
    from ohq_lightning.solver import InfeasibleBudgetError

    try:  # timm zero-initialises the last BatchNorm of residual blocks, which hides them from MQE when untrained
        model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, zero_init_last=False)
    except TypeError:
        model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    example = torch.randn(1, 3, args.input_size, args.input_size, generator=torch.Generator().manual_seed(args.seed))
    try:
        plan = search(
            model,
            example,
            target=args.target,
            compression_ratio=args.compression_ratio,
            latency_budget=args.latency_budget,
            options=None if args.options is None else [o for o in args.options.split(",") if o],
            sensitivity=args.sensitivity,
            synthetic=args.synthetic,
            num_samples=args.num_samples,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except (ValueError, InfeasibleBudgetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"OHQ plan for {args.model} @ {args.input_size}x{args.input_size} (random init, {args.target} target)")
    print(format_plan_table(plan))
    print("stage seconds: " + json.dumps({k: round(v, 2) for k, v in plan.meta["timings_s"].items()}))
    if args.out:
        plan.save(args.out)
        print(f"plan written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
