"""How each runtime turns a set of integer layers into a runnable graph: the one part of the CPU target
that differs between runtimes, chosen by name from :data:`_BUILDERS`."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ohq_lightning._util.timing import set_threads
from ohq_lightning.deploy import (
    QDQBuilder,
    TorchDeployedModel,
    TorchInt8Builder,
    activation_ranges,
    export_onnx,
    layer_nodes,
    ort_session,
)
from ohq_lightning.plan import Option
from ohq_lightning.sensitivity import gaussian_inputs

__all__ = ["RUNTIMES", "Deployment", "build_deployment", "kernel_of"]

_TITLES = {"onnxruntime": "ONNX Runtime", "torch": "torch"}


def kernel_of(option: Option, runtime: str = "onnxruntime") -> str:
    """The kernel an option runs on in ``runtime``: ``"int8"`` or ``"fp32"``; other options are refused."""
    if option.float_format == "fp32" or (not option.is_float and option.act_bits is None):
        return "fp32"  # weight-only options are dequantized once at load: float compute
    if not option.is_float and option.act_bits == 8:
        return "int8"
    raise ValueError(
        f"option {option.name!r} cannot run in {_TITLES.get(runtime, runtime)} on this CPU: it offers fp32 "
        "and integer options with 8-bit activations (w8a8, w4a8, w2a8; sub-8-bit weights run on the 8-bit kernel)"
    )


@dataclass(frozen=True)
class Deployment:
    """What the measurement loop needs from a runtime.

    ``build(bits)`` returns a zero-argument runner of the network with the layers whose bit is
    ``"1"`` on integer kernels; ``reference()`` returns the runner of the all-FP32 deployment (built
    only when something is to be timed, so a profile read from the cache builds nothing);
    ``graph_key`` hashes the architecture and ``version`` names the runtime (and engine) for the
    cache fingerprint.
    """

    graph_key: str
    version: str
    reference: Callable[[], Callable[[], Any]]
    build: Callable[[str], Callable[[], Any]]
    meta: dict[str, Any] = field(default_factory=dict)


def _graph_key(graph: Any) -> str:
    """A hash of the network's architecture (ops, wiring, attributes, tensor shapes), not its weight values."""
    digest = hashlib.sha256()
    for node in graph.graph.node:
        digest.update(f"{node.op_type}|{list(node.input)}|{list(node.output)}|{node.attribute}".encode())
    for init in graph.graph.initializer:
        digest.update(f"{init.name}|{list(init.dims)}|{init.data_type}".encode())
    for value in graph.graph.input:
        digest.update(str(value.type).encode())
    return digest.hexdigest()[:20]


def _onnxruntime(
    model: Any, example_inputs: torch.Tensor, names: list[str], *, threads: int, engine: str, seed: int
) -> Deployment:
    """ONNX Runtime: the exported float graph, and QDQ variants of it on ORT's int8 kernels."""
    import onnxruntime  # deferred: heavy, and only this runtime needs it (for its version)

    graph = export_onnx(model, example_inputs)
    missing = sorted(set(names) - set(layer_nodes(graph, names)))
    if missing:
        raise ValueError(f"layers {missing} have no node in the exported ONNX graph; they cannot be measured")
    ranges = activation_ranges(graph, names, [gaussian_inputs(example_inputs, 2, seed=seed)])
    feed = {"x": np.asarray(example_inputs.detach().cpu().numpy(), dtype=np.float32)}
    builder = QDQBuilder(graph, ranges)

    def reference() -> Callable[[], Any]:
        return functools.partial(ort_session(graph.SerializeToString(), threads).run, None, feed)

    @functools.cache
    def check_rewrites() -> None:
        builder.build(dict.fromkeys(names, "w8a8"))  # every layer's rewrite checked once; mixes leave some out

    def build(bits: str) -> Callable[[], Any]:
        check_rewrites()
        chosen = {name: "w8a8" for name, bit in zip(names, bits, strict=True) if bit == "1"}
        session = ort_session(builder.build(chosen, check=False).SerializeToString(), threads)
        return functools.partial(session.run, None, feed)

    return Deployment(
        _graph_key(graph),
        f"onnxruntime-{onnxruntime.__version__}-nospin",  # timings taken with spinning on are not reused
        reference,
        build,
        {"reference": "the float ONNX graph", "intra_op_spinning": False},
    )


def _torch(
    model: Any, example_inputs: torch.Tensor, names: list[str], *, threads: int, engine: str, seed: int
) -> Deployment:
    """torch: one traced, fused, calibrated FX graph; each mix is converted from it for the engine."""
    set_threads(threads)
    builder = TorchInt8Builder(
        model,
        example_inputs,
        calibration_inputs=[gaussian_inputs(example_inputs, 2, seed=seed)],
        engine=engine,
    )
    missing = sorted(set(names) - set(builder.layer_names))
    if missing:
        raise ValueError(f"layers {missing} are not quantizable layers of the model; they cannot be measured")

    def deployed(bits: str) -> TorchDeployedModel:
        assignment = {name: "w8a8" if bit == "1" else "fp32" for name, bit in zip(names, bits, strict=True)}
        return TorchDeployedModel(assignment, builder.build(assignment), threads, engine=engine)

    return Deployment(
        builder.architecture_key(),
        f"torch-{torch.__version__}-{engine}",
        lambda: deployed("0" * len(names)).runner(example_inputs),
        lambda bits: deployed(bits).runner(example_inputs),
        {"engine": engine, "reference": "the float FX graph, BatchNorm folded, channels-last"},
    )


_BUILDERS: dict[str, Callable[..., Deployment]] = {"onnxruntime": _onnxruntime, "torch": _torch}

RUNTIMES: tuple[str, ...] = tuple(_BUILDERS)
"""The runtimes the CPU target measures in."""


def build_deployment(
    runtime: str, model: Any, example_inputs: torch.Tensor, names: list[str], *, threads: int, engine: str, seed: int
) -> Deployment:
    """The deployment of ``model`` in ``runtime`` whose mixes put the layers ``names`` on integer kernels."""
    return _BUILDERS[runtime](model, example_inputs, names, threads=threads, engine=engine, seed=seed)
