"""Hardware-aware mixed-precision quantization in a Lightning fit: :class:`OHQCallback` and its helpers.

* :mod:`~ohq_lightning.lightning.callback`: the callback (hooks and the short steps they call);
* :mod:`~ohq_lightning.lightning.checkpoint`: what a checkpoint holds before its weights load;
* :mod:`~ohq_lightning.lightning.inputs`: the example and calibration inputs, from the train dataloader;
* :mod:`~ohq_lightning.lightning.qat`: installing the plan, and what is said when fine-tuning diverges;
* :mod:`~ohq_lightning.lightning.export`: the ONNX export measured at the end of fit.

(Inside this package, ``import lightning`` still means the third-party Lightning: imports are absolute.)
"""

from ohq_lightning.lightning.callback import OHQCallback
from ohq_lightning.lightning.checkpoint import plan_from_checkpoint
from ohq_lightning.lightning.inputs import CALIBRATION_SOURCES, default_input_fn
from ohq_lightning.lightning.qat import QATDivergedError

__all__ = ["CALIBRATION_SOURCES", "OHQCallback", "QATDivergedError", "default_input_fn", "plan_from_checkpoint"]
