"""Deploy a plan to ONNX Runtime's real kernels: export, observe ranges, build the QDQ graph, open a session."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ohq_lightning.deploy.base import (
    BaseDeployedModel,
    check_known_layers,
    plan_assignment,
    to_numpy,
    uniform_assignment,
)
from ohq_lightning.deploy.learned import learned_input_qparams, learned_weight_scale
from ohq_lightning.deploy.onnxruntime.export import export_onnx
from ohq_lightning.deploy.onnxruntime.qdq import QDQBuilder
from ohq_lightning.deploy.onnxruntime.ranges import activation_ranges
from ohq_lightning.deploy.onnxruntime.session import ort_session
from ohq_lightning.deploy.onnxruntime.weights import FixedQuantization
from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import Option, QuantPlan
from ohq_lightning.quant.export import learned_quantization
from ohq_lightning.quant.swap import float_copy, quantized_layers

__all__ = ["DeployedModel", "convert", "learned_grids", "uniform"]


@dataclass
class DeployedModel(BaseDeployedModel):
    """A model on ONNX Runtime's kernels: its ONNX graph, a session, and the plan it follows."""

    assignment: dict[str, str]
    onnx_model: Any
    session: Any
    threads: int
    runtime: str = "onnxruntime"

    def runner(self, example_inputs: torch.Tensor | np.ndarray) -> Callable[[], Any]:
        """A zero-argument callable running one inference on ``example_inputs`` (the feed is built once)."""
        array = np.ascontiguousarray(to_numpy(example_inputs), dtype=np.float32)
        feed = {self.session.get_inputs()[0].name: array}
        return functools.partial(self.session.run, None, feed)

    def _output_array(self, outputs: Any) -> np.ndarray:
        return outputs[0]

    def save(self, path: str | Path) -> Path:
        """Write the ONNX graph (QDQ where the plan quantizes) to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.onnx_model.SerializeToString())
        return path


def learned_grids(model: nn.Module, plan: QuantPlan | Mapping[str, str]) -> dict[str, FixedQuantization]:
    """The grids ``model``'s fake-quant layers learned, as the QDQ builder takes them, for the integer
    layers of ``plan``.

    A layer's weight grid is taken when the plan gives it the weight bits its fake-quant layer has,
    and its input grid when the activation bits match and its input quantizer was calibrated (or
    initialised by a forward pass). Anything else (another option than the one fine-tuned, a
    quantizer never calibrated, a layer with no fake-quant twin) is left out, and the builder derives
    it as for a float model. A model with no plan applied gives an empty mapping.
    """
    learned = learned_quantization(model)
    layers = quantized_layers(model)
    grids: dict[str, FixedQuantization] = {}
    for name, option_name in plan_assignment(plan).items():
        option = Option.parse(option_name)
        found = learned.get(name)
        if option.is_float or found is None:
            continue
        assert option.weight_bits is not None
        weight = bits = scale = None
        learned_scale = learned_weight_scale(found, option.weight_bits)
        if learned_scale is not None:
            weight = layers[name].weight.detach().float().cpu().numpy()  # the float weight it fake-quantizes
            bits, scale = option.weight_bits, learned_scale.numpy()
        x_qparams = learned_input_qparams(found) if option.act_bits == 8 else None
        if weight is not None or x_qparams is not None:
            grids[name] = FixedQuantization(weight, bits, scale, x_qparams)
    return grids


def convert(
    model: nn.Module,
    plan: QuantPlan | Mapping[str, str],
    example_inputs: torch.Tensor,
    *,
    calibration_inputs: Sequence[torch.Tensor] | None = None,
    threads: int = 1,
) -> DeployedModel:
    """Deploy ``model`` following ``plan`` to ONNX Runtime.

    Layers at integer options run on ORT's int8 kernels (u8 activations, s8 per-channel weights,
    sub-8-bit weights on their grid inside int8); float layers stay float, and quantize/dequantize
    sit where the precision changes (:mod:`~ohq_lightning.deploy.onnxruntime.qdq`). The model is not
    changed.

    A model holding fake-quant layers (after :func:`~ohq_lightning.quant.apply_plan`,
    :func:`~ohq_lightning.quant.calibrate` and perhaps QAT) is deployed with the quantization it
    learned (:func:`learned_grids`): integer weights ``clip(round(w / s))`` with its learned
    per-channel steps ``s``, and its inputs on its learned grids. Only layers whose input quantizer
    was never calibrated, or that the plan puts at another option than their fake-quant twin, get
    scales derived from the float weights and ``calibration_inputs``. The deployment follows the
    fake-quant model closely but not bit-exactly: ORT requantizes integer outputs to uint8 and
    accumulates in int32 in another order. Why, and the measured tolerance: ``docs/notes/deploy.md``.

    Args:
        model: the model (plain, or with a plan applied).
        plan: a :class:`~ohq_lightning.plan.QuantPlan` or a mapping layer -> option.
        example_inputs: one input batch; it fixes the deployed graph's input shape.
        calibration_inputs: batches whose activation ranges set the int8 scales that are not learned
            (default: the example).
        threads: intra-op threads of the session.
    """
    assignment = plan_assignment(plan)
    float_model = float_copy(model)
    graph = export_onnx(float_model, example_inputs)
    names = trace_layers(float_model, example_inputs).names()
    check_known_layers(assignment, names)
    ranges = activation_ranges(graph, names, list(calibration_inputs or [example_inputs]), threads=threads)
    deployed = QDQBuilder(graph, ranges, learned_grids(model, assignment)).build(assignment)
    return DeployedModel(assignment, deployed, ort_session(deployed.SerializeToString(), threads), threads)


def uniform(model: nn.Module, option: str, example_inputs: torch.Tensor, **kwargs: Any) -> DeployedModel:
    """Deploy ``model`` with every quantizable layer at ``option`` (``"w8a8"`` or ``"fp32"``), like :func:`convert`.

    On a fake-quant model, learned grids are used where they fit ``option`` (see :func:`learned_grids`).
    """
    return convert(model, uniform_assignment(model, option, example_inputs), example_inputs, **kwargs)
