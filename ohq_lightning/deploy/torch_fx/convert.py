"""Deploy a plan to torch's own int8 CPU kernels (x86/fbgemm, or qnnpack on ARM) through torch.fx."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ohq_lightning._util.timing import set_threads
from ohq_lightning.deploy.base import BaseDeployedModel, plan_assignment, uniform_assignment
from ohq_lightning.deploy.torch_fx.builder import TorchInt8Builder
from ohq_lightning.deploy.torch_fx.engine import quantized_engine
from ohq_lightning.plan import QuantPlan

__all__ = ["TorchDeployedModel", "convert_torch", "uniform_torch"]


@dataclass
class TorchDeployedModel(BaseDeployedModel):
    """A model on torch's int8 CPU kernels: the converted FX graph module and the plan it follows.

    Attributes:
        assignment: layer name -> option, as deployed.
        module: the converted ``torch.fx.GraphModule`` (quantized modules where the plan is integer).
        threads: torch intra-op threads set for it (process-wide, set once).
        runtime: ``"torch"``.
        engine: torch's quantized engine the weights were packed for (``"x86"``, ``"qnnpack"``...).
    """

    assignment: dict[str, str]
    module: torch.fx.GraphModule
    threads: int
    runtime: str = "torch"
    engine: str = "x86"

    def runner(self, example_inputs: torch.Tensor | np.ndarray) -> Callable[[], Any]:
        """A zero-argument callable that runs one inference on ``example_inputs`` (for timing)."""
        module, engine = self.module, self.engine
        if not isinstance(example_inputs, torch.Tensor):
            example_inputs = torch.from_numpy(np.asarray(example_inputs, np.float32))
        tensor = example_inputs.detach().float().cpu()

        def run() -> Any:
            with torch.no_grad(), quantized_engine(engine):
                return module(tensor)

        return run

    def _output_array(self, outputs: Any) -> np.ndarray:
        return outputs.numpy()


def convert_torch(
    model: nn.Module,
    plan: QuantPlan | Mapping[str, str],
    example_inputs: torch.Tensor,
    *,
    calibration_inputs: Sequence[torch.Tensor] | None = None,
    threads: int = 1,
    engine: str = "x86",
) -> TorchDeployedModel:
    """Deploy ``model`` following ``plan`` to torch's int8 CPU kernels (see
    :mod:`~ohq_lightning.deploy.torch_fx.builder` for how layers and the ops between them are placed).

    Args:
        model: the model (plain, or with a plan applied: deployed from its float weights with the
            step sizes it learned; the model is not changed).
        plan: a :class:`~ohq_lightning.plan.QuantPlan` or a mapping layer -> option; layers not
            named stay float.
        example_inputs: one input tensor.
        calibration_inputs: batches whose ranges set activation quantization where no learned step
            exists (default: the example).
        threads: torch intra-op threads (process-wide: set once per process, see
            :func:`~ohq_lightning._util.timing.set_threads`).
        engine: torch's quantized engine: ``"x86"`` (default), ``"fbgemm"``, ``"onednn"`` or ``"qnnpack"`` (ARM).

    Raises:
        ValueError: a model torch.fx cannot trace, layers the model lacks, or options torch's kernels
            cannot run.
    """
    set_threads(threads)
    builder = TorchInt8Builder(model, example_inputs, calibration_inputs=calibration_inputs, engine=engine)
    assignment = plan_assignment(plan)
    return TorchDeployedModel(assignment, builder.build(assignment), threads, engine=engine)


def uniform_torch(model: nn.Module, option: str, example_inputs: torch.Tensor, **kwargs: Any) -> TorchDeployedModel:
    """Deploy ``model`` with every quantizable layer at ``option`` (e.g. ``"w8a8"``), like :func:`convert_torch`."""
    return convert_torch(model, uniform_assignment(model, option, example_inputs), example_inputs, **kwargs)
