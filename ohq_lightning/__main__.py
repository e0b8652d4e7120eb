"""``python -m ohq_lightning``: the Hydra app (see ``conf/config.yaml`` and ``recipes/``).

Examples::

    python -m ohq_lightning +recipe=mobilenetv3            # built-in offline data, this CPU, a few minutes
    python -m ohq_lightning +recipe=resnet18 ohq.compression_ratio=0.5
    python -m ohq_lightning -m +recipe=resnet18 ohq.compression_ratio=0.5,0.6,0.7,0.8   # one Pareto summary
    python -m ohq_lightning --cfg job                       # print the composed config
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ohq_lightning.cli.config import register_configs
from ohq_lightning.cli.job import run_job
from ohq_lightning.cli.job_report import summary_table
from ohq_lightning.solver import InfeasibleBudgetError

__all__ = ["main"]

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://ohq_lightning.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run the job on the composed config and print its summary."""
    output_dir = HydraConfig.get().runtime.output_dir
    try:
        report = run_job(cfg, output_dir)
    except (ValueError, InfeasibleBudgetError) as error:  # bad input: the message, not a traceback
        raise SystemExit(f"error: {error}") from None
    print()
    print(summary_table(report))
    ratios = report["ratios"]
    print(
        f"OHQ / uniform INT8 latency {ratios['ohq_over_int8']:.3f}, "
        f"OHQ / best uniform {ratios['ohq_over_best_uniform']:.3f}; plan options {report['plan']['option_counts']}"
    )
    print(f"report: {output_dir}/report.md (report.json, plan.json, plan.png, accuracy_latency.png)")


if __name__ == "__main__":
    main()
