"""The torch runtime: a plan on torch's own int8 CPU kernels through FX graph-mode quantization.

``engine`` (quantized engines), ``graph`` (tracing and normalising the float model), ``observers``
(range recording and the observers conversion reads), ``weights`` (weights on their grid),
``builder`` (:class:`TorchInt8Builder`: one fused graph, any plan) and ``convert`` (plan ->
:class:`TorchDeployedModel`).
"""

from ohq_lightning.deploy.torch_fx.builder import TorchInt8Builder
from ohq_lightning.deploy.torch_fx.convert import TorchDeployedModel, convert_torch, uniform_torch
from ohq_lightning.deploy.torch_fx.engine import ENGINES, quantized_engine

__all__ = ["ENGINES", "TorchDeployedModel", "TorchInt8Builder", "convert_torch", "quantized_engine", "uniform_torch"]
