"""How much each layer's accuracy suffers at each option: the sensitivity half of the ILP.

* :mod:`~ohq_lightning.sensitivity.mqe`: MQE, the paper's data-free score (KL divergence with one layer perturbed);
* :mod:`~ohq_lightning.sensitivity.baselines`: data-free baselines (weight error, random);
* :mod:`~ohq_lightning.sensitivity.hessian`: the HAWQ-style baseline (needs real data and a loss);
* :mod:`~ohq_lightning.sensitivity.synthetic`: the synthetic inputs MQE scores on (Gaussian, BN-distilled; cached);
* :mod:`~ohq_lightning.sensitivity.registry`: the methods a search computes by name;
* :mod:`~ohq_lightning.sensitivity.stage`: the search's sensitivity stage (settings -> checked table).

Layout and design notes: docs/notes/sensitivity.md.
"""

from ohq_lightning.sensitivity.baselines import random_sensitivity, weight_error_sensitivity, weight_quantization_error
from ohq_lightning.sensitivity.hessian import TRACE_MODES, hessian_sensitivity
from ohq_lightning.sensitivity.mqe import DEFAULT_MASK_FRACTIONS, PERTURBATIONS, kl_divergence, mqe_sensitivity
from ohq_lightning.sensitivity.registry import (
    METHODS,
    MQE_METHODS,
    SENSITIVITY_REGISTRY,
    SensitivityFn,
    SensitivityMethod,
    SensitivityProvider,
    sensitivity_by_name,
    sensitivity_method,
)
from ohq_lightning.sensitivity.stage import check_coverage, compute_sensitivity, sensitivity_table
from ohq_lightning.sensitivity.synthetic import (
    SYNTHETIC_KINDS,
    distilled_inputs,
    example_tensor,
    gaussian_inputs,
    model_fingerprint,
    synthetic_inputs,
)

__all__ = [
    "DEFAULT_MASK_FRACTIONS",
    "METHODS",
    "MQE_METHODS",
    "PERTURBATIONS",
    "SENSITIVITY_REGISTRY",
    "SYNTHETIC_KINDS",
    "TRACE_MODES",
    "SensitivityFn",
    "SensitivityMethod",
    "SensitivityProvider",
    "check_coverage",
    "compute_sensitivity",
    "distilled_inputs",
    "example_tensor",
    "gaussian_inputs",
    "hessian_sensitivity",
    "kl_divergence",
    "model_fingerprint",
    "mqe_sensitivity",
    "random_sensitivity",
    "sensitivity_by_name",
    "sensitivity_method",
    "sensitivity_table",
    "synthetic_inputs",
    "weight_error_sensitivity",
    "weight_quantization_error",
]
