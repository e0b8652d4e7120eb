"""The Hydra app: configs compose and are checked, the job runs end to end, sweeps are summarised, wheels work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ohq_lightning.cli.config import JobConfig, register_configs
from ohq_lightning.cli.data import build_data
from ohq_lightning.cli.job import objective_record, search_settings
from ohq_lightning.cli.model import build_model, load_weights
from ohq_lightning.config import Budgets, SearchConfig
from ohq_lightning.report.sweep import summarize

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(path.stem for path in (ROOT / "recipes").glob("*.yaml"))
# A job small enough for the test suite: a tiny timm model at 32x32, a few timed graphs, a short evaluation.
SMALL_JOB = [
    "model.name=resnet10t",
    "data.image_size=32",
    "data.max_eval_samples=64",
    "train.epochs=2",
    "train.optimizer=adamw",
    "train.lr=0.003",
    "hardware.samples_per_layer=1.5",
    "hardware.timing.max_seconds=0.05",
    "hardware.timing.min_repeats=3",
    "ohq.num_samples=2",
    "ohq.calibration_batches=1",
    "eval.timing_rounds=1",
    "eval.max_seconds=0.1",
    "trainer.progress_bar=false",
]


def compose_job(*overrides: str) -> JobConfig:
    register_configs()
    with initialize_config_module(config_module="ohq_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ohq_lightning", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=900,
    )


def test_the_issue_asks_for_these_recipes() -> None:
    assert {"resnet18", "mobilenetv3", "mobilenetv3_small", "mobilenetv2"} <= set(RECIPES)
    for recipe in RECIPES:
        assert (ROOT / "recipes" / f"{recipe}.yaml").read_text().startswith("# @package _global_")


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_into_the_schema(recipe: str) -> None:
    cfg = compose_job(f"+recipe={recipe}")
    assert isinstance(cfg, JobConfig)
    assert cfg.data.name == "digits" and cfg.hardware["name"] == "cpu"
    import timm

    assert timm.is_model(cfg.model.name)


@pytest.mark.parametrize("hardware", sorted(p.stem for p in (ROOT / "conf" / "hardware").glob("*.yaml")))
def test_every_hardware_config_builds_its_target(hardware: str) -> None:
    from ohq_lightning.hardware import create_target

    extra = ["hardware.path=/nonexistent.csv"] if hardware == "table" else []
    cfg = compose_job(f"hardware={hardware}", *extra)
    settings = dict(cfg.hardware)
    name = settings.pop("name")
    if hardware == "table":
        with pytest.raises(ValueError, match="nonexistent"):
            create_target(name, **settings)
    else:
        assert create_target(name, **settings).name == name


def test_wrong_types_and_typos_fail_with_the_key_named(tmp_path: Path) -> None:
    wrong_type = run_cli("ohq.compression_ratio=abc", cwd=tmp_path)
    assert wrong_type.returncode == 1
    assert "could not be converted to Float" in wrong_type.stderr and "ohq.compression_ratio" in wrong_type.stderr
    typo = run_cli("ohq.compresion_ratio=0.5", cwd=tmp_path)
    assert typo.returncode == 1 and "Key 'compresion_ratio' not in 'OHQConfig'" in typo.stderr


def test_objective_defaults_to_fastest_plan_as_accurate_as_int8() -> None:
    assert objective_record(compose_job().ohq) == {"minimize": "latency", "sensitivity_budget": "w8a8"}
    given = compose_job("ohq.compression_ratio=0.6").ohq
    assert objective_record(given) == {"minimize": "sensitivity", "compression_ratio": 0.6}
    assert objective_record(compose_job("ohq.plan=plan.json").ohq) == {}


def test_ohq_config_builds_the_config_objects_and_they_check_its_values() -> None:
    ohq = compose_job("ohq.compression_ratio=0.6", "ohq.options=[w8a8,W4A8]", "ohq.seed=3").ohq
    assert ohq.budgets() == Budgets(compression_ratio=0.6)
    assert ohq.search_config() == SearchConfig(options=("w8a8", "w4a8"), seed=3)
    assert search_settings(ohq) == (Budgets(compression_ratio=0.6), SearchConfig(options=("w8a8", "w4a8"), seed=3))
    with pytest.raises(ValueError, match=r"ohq.plan='missing.json' is not a file"):
        search_settings(compose_job("ohq.plan=missing.json").ohq)


def test_a_plan_file_with_budgets_beside_it_is_refused_not_silently_dropped(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    assert search_settings(compose_job(f"ohq.plan={plan}").ohq)[0] == Budgets()
    with pytest.raises(ValueError, match=r"so ohq.compression_ratio, ohq.options would be ignored"):
        search_settings(compose_job(f"ohq.plan={plan}", "ohq.compression_ratio=0.6", "ohq.options=[w8a8]").ohq)
    result = run_cli(f"ohq.plan={plan}", "ohq.compression_ratio=0.5", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: ohq.plan skips the search, so ohq.compression_ratio would be ignored" in result.stderr
    assert not (tmp_path / "run" / "float").exists()  # refused before any training
    with pytest.raises(ValueError, match="compression_ratio must be a finite number > 0"):
        compose_job("ohq.compression_ratio=-0.5").ohq.budgets()
    with pytest.raises(ValueError, match="unknown sensitivity method 'kl'"):
        compose_job("ohq.sensitivity=kl").ohq.search_config()
    with pytest.raises(ValueError, match="needs a resource budget"):
        search_settings(compose_job("ohq.minimize=sensitivity").ohq)


def test_the_hydra_defaults_are_the_config_objects_defaults() -> None:
    ohq = compose_job().ohq
    assert ohq.budgets() == Budgets() and ohq.search_config() == SearchConfig()
    tuned = compose_job("ohq.tie_groups=[[a,b]]", "ohq.cost_weight=0.5", "ohq.refine_rounds=2").ohq.search_config()
    assert (tuned.tie_groups, tuned.cost_weight, tuned.refine_rounds) == ((("a", "b"),), 0.5, 2)


def test_bad_ohq_values_fail_in_one_line_before_any_training(tmp_path: Path) -> None:
    result = run_cli("ohq.num_samples=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "error: num_samples must be an integer >= 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "float").exists()


def test_the_old_sweep_module_still_summarises(tmp_path: Path) -> None:
    import ohq_lightning.sweep

    assert ohq_lightning.sweep.summarize is summarize
    result = subprocess.run(
        [sys.executable, "-m", "ohq_lightning.sweep", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and "error: no report.json" in result.stderr


def test_data_reads_nothing_from_the_network_and_names_missing_paths(tmp_path: Path) -> None:
    data = build_data("digits", image_size=16, max_eval_samples=50)
    assert data.describe() == {"name": "digits", "train": 1200, "test": 50, "classes": 10, "image_size": 16}
    with pytest.raises(ValueError, match=r"data.root=/path/to/imagefolder"):
        build_data("imagefolder")
    with pytest.raises(ValueError, match="cifar-10-batches-py"):
        build_data("cifar10", root=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_data("mnist")


def test_model_weights_load_from_a_lightning_checkpoint_and_mismatches_are_named(tmp_path: Path) -> None:
    import torch

    source = build_model("resnet10t", num_classes=10)
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.ckpt")
    loaded = build_model("resnet10t", num_classes=10, checkpoint=str(tmp_path / "w.ckpt"))
    pairs = zip(source.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(ValueError, match=r"fc.weight: \(10, 512\) in the file, \(5, 512\) in the model"):
        load_weights(build_model("resnet10t", num_classes=5), tmp_path / "w.ckpt")
    with pytest.raises(ValueError, match="unknown timm model 'resnet1000'"):
        build_model("resnet1000", num_classes=10)
    with pytest.raises(ValueError, match="not in the local cache"):
        build_model("resnet10t", num_classes=10, pretrained=True)


def test_unknown_recipe_lists_the_recipes(tmp_path: Path) -> None:
    result = run_cli("+recipe=nope", cwd=tmp_path)
    assert result.returncode != 0
    assert "recipe/nope" in result.stderr and all(recipe in result.stderr for recipe in RECIPES)


def test_unknown_group_options_and_wrong_integer_types_are_named(tmp_path: Path) -> None:
    unknown = run_cli("hardware=nope", cwd=tmp_path)
    assert unknown.returncode != 0
    assert "hardware/nope" in unknown.stderr and all(name in unknown.stderr for name in ("cpu", "analytical"))
    fractional = run_cli("+recipe=resnet18", "ohq.qat_epochs=1.5", cwd=tmp_path)
    assert fractional.returncode == 1 and "ohq.qat_epochs" in fractional.stderr


def _fake_report(directory: Path, ratio: float, accuracy: float, latency: float) -> None:
    directory.mkdir(parents=True)
    entry = {"accuracy": accuracy, "size_bytes": 1e6 * ratio, "latency_ms": latency, "predicted_latency_ms": latency}
    report = {
        "model": "m",
        "objective": {"minimize": "sensitivity", "compression_ratio": ratio},
        "fp32": {"accuracy": 0.95, "size_bytes": 4e6, "latency_ms": 2.0},
        "int8": {"accuracy": 0.94, "size_bytes": 1e6, "latency_ms": 1.5},
        "ohq": entry,
        "ratios": {"ohq_over_int8": latency / 1.5},
        "plan": {"option_counts": {"w8a8": 3}},
    }
    (directory / "report.json").write_text(json.dumps(report))


def test_sweep_summary_tables_and_plots_every_run(tmp_path: Path) -> None:
    _fake_report(tmp_path / "0", 0.5, 0.90, 1.0)
    _fake_report(tmp_path / "1", 0.8, 0.93, 1.2)
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "report.json").write_text("{not json")
    summary = summarize(tmp_path)
    assert [run["label"] for run in summary["runs"]] == ["compression_ratio=0.5", "compression_ratio=0.8"]
    assert summary["baselines"]["uniform INT8"]["latency_ms"] == 1.5
    text = (tmp_path / "sweep.md").read_text()
    assert "compression_ratio=0.8" in text and "uniform INT8" in text
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and (tmp_path / "pareto_size.png").is_file()
    with pytest.raises(ValueError, match=r"no report\.json"):
        summarize(tmp_path / "0" / "nothing-here")


@pytest.mark.slow
def test_small_job_end_to_end_writes_the_report(tmp_path: Path) -> None:
    """The real job on a tiny timm model: float training, measured search, QAT, deployment, report."""
    result = run_cli(*SMALL_JOB, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    for key in ("fp32", "int8", "ohq"):
        assert {"accuracy", "size_bytes", "latency_ms"} <= set(report[key])
        assert report[key]["latency_ms"] > 0 and 0 <= report[key]["accuracy"] <= 1
    assert report["ohq"]["predicted_latency_ms"] > 0 and report["cost_source"] == "fitted"
    assert report["data"]["test"] == 64 and report["fp32"]["size_bytes"] > report["int8"]["size_bytes"]
    assert report["fp32"]["accuracy"] > 0.5  # trained on real digits for two epochs: far above chance (0.1)
    assert 0 <= report["ohq"]["calibration_only_accuracy"] <= 1
    limit = report["plan"]["latency_limit_ms"]  # the search's latency model: each layer at its fastest option
    assert 0 < limit <= report["ohq"]["predicted_latency_ms"] + 1e-9
    assert report["ratios"]["ohq_over_limit"] == pytest.approx(report["ohq"]["latency_ms"] / limit)
    assert "calibration only, without fine-tuning" in (run / "report.md").read_text()
    for name in ("report.md", "plan.json", "plan.png", "accuracy_latency.png", "float_model.pt"):
        assert (run / name).is_file(), name
    assert "uniform INT8" in result.stdout and "OHQ plan" in result.stdout
    log = (run / "ohq_lightning.log").read_text()  # the job is named ohq_lightning, not __main__
    assert not (run / "__main__.log").exists()
    assert "] - OHQ plan (" in log and "| option |" in log and "\npredicted: " in log  # the plan table
    assert "| uniform INT8 |" in log and "OHQ / uniform INT8 latency" in log  # the summary table


@pytest.mark.slow
def test_two_value_sweep_writes_one_summary(tmp_path: Path) -> None:
    overrides = [o for o in SMALL_JOB if not o.startswith("hardware.")] + ["hardware=analytical", "ohq.qat_epochs=0"]
    result = run_cli(
        "-m", *overrides, "ohq.compression_ratio=0.6,0.9", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sorted(run["label"] for run in summary["runs"]) == ["compression_ratio=0.6", "compression_ratio=0.9"]
    assert (tmp_path / "sweep" / "pareto.png").is_file()


@pytest.mark.slow
def test_configs_are_found_from_an_installed_wheel(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("ohq_lightning-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "ohq_lightning/conf/config.yaml" in names and "ohq_lightning/conf/recipe/mobilenetv3.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import ohq_lightning; print(ohq_lightning.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert where.stdout.startswith(str(site))
    result = run_cli("--cfg", "job", "+recipe=resnet18", cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "name: resnet18" in result.stdout
    shown = run_cli("--help", cwd=elsewhere, env=env)
    assert shown.returncode == 0 and "+recipe=resnet18" in shown.stdout and "hardware=cpu " in shown.stdout
    assert str(site / "ohq_lightning" / "conf") in shown.stdout


def test_help_says_what_the_job_does_and_lists_the_recipes_and_groups(tmp_path: Path) -> None:
    result = run_cli("--help", "hardware=analytical", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "powered by Hydra" not in text
    for words in ("train", "search", "fine-tune", "deploy FP32, uniform INT8 and the plan", "measured latency"):
        assert words in text, words
    assert all(f"+recipe={recipe} " in text for recipe in RECIPES)
    for group in ("data", "hardware", "model", "ohq", "trainer", "eval"):
        options = sorted(path.stem for path in (ROOT / "conf" / group).glob("*.yaml"))
        assert options and all(f"{group}={option} " in text for option in options), group
    assert "hardware (chosen: analytical)" in text and "data (chosen: digits)" in text  # with the overrides given
    assert "--cfg job" in text and str(ROOT / "conf") in text and "ohq_lightning.log" in text


def test_a_file_that_is_not_a_checkpoint_is_named_with_what_was_expected(tmp_path: Path) -> None:
    import torch

    source = build_model("resnet10t", num_classes=10)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "good.ckpt")
    whole = (tmp_path / "good.ckpt").read_bytes()
    contents = {
        "notes.txt": b"not weights\n",
        "truncated.ckpt": whole[: len(whole) // 2],
        "random.pt": bytes(range(256)) * 4,
        "fake.safetensors": b"not a safetensors file",
    }
    for name, content in contents.items():
        (tmp_path / name).write_bytes(content)
    torch.save(source, tmp_path / "pickled_model.pt")  # a whole module: its classes are not unpickled
    causes = {
        "notes.txt": "not a file torch.save or safetensors writes",
        "truncated.ckpt": "empty or truncated",
        "random.pt": "not a file torch.save or safetensors writes",
        "fake.safetensors": "not a readable .safetensors file",
        "pickled_model.pt": "pickled timm.models.resnet.ResNet, not only tensors",
    }
    for name, cause in causes.items():
        with pytest.raises(ValueError) as caught:
            build_model("resnet10t", num_classes=10, checkpoint=str(tmp_path / name))
        message = str(caught.value)
        assert "\n" not in message and f"model.checkpoint={str(tmp_path / name)!r} is not a checkpoint" in message
        assert cause in message and "weights_only" not in message, message
        assert (
            "expected a state dict (torch.save(model.state_dict(), path)), a .safetensors file or a Lightning .ckpt"
            in message
        )


@pytest.mark.parametrize("name", ["random.pt", "fake.safetensors"])
def test_a_file_that_is_not_a_checkpoint_fails_in_one_line_before_training(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 4 if name.endswith(".pt") else b"not a safetensors file")
    run = tmp_path / "run"
    result = run_cli("model.name=resnet10t", f"model.checkpoint={path}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"model.checkpoint={str(path)!r} is not a checkpoint" in errors[0], result.stderr
    assert "expected a state dict" in errors[0]
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr + result.stdout
    assert not (run / "float").exists() and not (run / "qat").exists()


def test_an_imagefolder_class_without_images_fails_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            (root / split / label / "0.jpg").write_bytes(b"")  # ImageFolder goes by the names, not the contents
    (root / "train" / "dog" / "0.jpg").unlink()
    (root / "train" / "dog" / "notes.txt").write_text("no images here")
    run = tmp_path / "run"
    result = run_cli("data=imagefolder", f"data.root={root}", "train.epochs=0", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"no images in {root / 'train' / 'dog'};" in errors[0], result.stderr
    assert "expected image files ending in .jpg, .jpeg, .png" in errors[0] and "Traceback" not in result.stderr
    (root / "empty").mkdir()
    (root / "empty" / "train").mkdir()
    (root / "empty" / "val").mkdir()
    with pytest.raises(ValueError, match=r"train has no class directories; expected .*/train/<class>/ holding image"):
        build_data("imagefolder", root=str(root / "empty"))


def test_infeasible_budget_exits_with_the_smallest_feasible_value(tmp_path: Path) -> None:
    result = run_cli(
        "model.name=resnet10t",
        "train.epochs=0",
        "hardware=analytical",
        "ohq.compression_ratio=0.05",
        "ohq.synthetic=gaussian",
        "ohq.num_samples=2",
        "trainer.progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "error:" in result.stderr and "smallest feasible compression_ratio" in result.stderr
    assert "Traceback" not in result.stderr
