"""``python -m ohq_lightning``: the Hydra app (see ``conf/config.yaml`` and ``recipes/``).

Examples::

    python -m ohq_lightning +recipe=mobilenetv3            # built-in offline data, this CPU, a few minutes
    python -m ohq_lightning +recipe=resnet18 ohq.compression_ratio=0.5
    python -m ohq_lightning -m +recipe=resnet18 ohq.compression_ratio=0.5,0.6,0.7,0.8   # one Pareto summary
    python -m ohq_lightning --cfg job                       # print the composed config
"""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ohq_lightning.cli.config import register_configs
from ohq_lightning.cli.job import run_job
from ohq_lightning.cli.job_report import summary_table
from ohq_lightning.solver import InfeasibleBudgetError

__all__ = ["main"]

_log = logging.getLogger("ohq_lightning")  # not __name__: that is "__main__" under python -m

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://ohq_lightning.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run the job on the composed config and log its summary (console and ``ohq_lightning.log``)."""
    output_dir = HydraConfig.get().runtime.output_dir
    try:
        report = run_job(cfg, output_dir)
    except (ValueError, InfeasibleBudgetError) as error:  # bad input: the message, not a traceback
        raise SystemExit(f"error: {error}") from None
    ratios = report["ratios"]
    _log.info(
        "FP32, uniform INT8 and the OHQ plan, deployed and measured:\n%s\nOHQ / uniform INT8 latency %.3f, OHQ / best "
        "uniform %.3f; plan options %s\nreport: %s/report.md (report.json, plan.json, plan.png, accuracy_latency.png)",
        summary_table(report),
        ratios["ohq_over_int8"],
        ratios["ohq_over_best_uniform"],
        report["plan"]["option_counts"],
        output_dir,
    )


if __name__ == "__main__":
    main()
