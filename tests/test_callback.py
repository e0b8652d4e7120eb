"""OHQCallback: search + swap in setup, QAT, checkpoints, resume, evaluation from a checkpoint, DDP."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ModelPruning
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning_helpers import (
    FitStartRecorder,
    KeywordCNN,
    KeywordOnlyCNN,
    MarkingTarget,
    PruningRecorder,
    TinyCNN,
    dict_loader,
    fake_quant_module_names,
    image_keyword,
    image_loader,
    random_images,
)

import ohq_lightning
import ohq_lightning.callback as compat_module
import ohq_lightning.lightning.callback as callback_module  # where the callback looks ``search`` up
from ohq_lightning.config import Budgets, SearchConfig
from ohq_lightning.lightning import (
    CALIBRATION_SOURCES,
    OHQCallback,
    QATDivergedError,
    default_input_fn,
    plan_from_checkpoint,
)
from ohq_lightning.plan import QuantPlan
from ohq_lightning.quant import QuantLayer, apply_plan, quantized_layers
from ohq_lightning.quant.modules import is_weight_pruned

SEARCH = {"compression_ratio": 0.6, "synthetic": "gaussian", "num_samples": 4, "progress": False}
HAND_PLAN = QuantPlan(
    assignment={"features.0": "w8a8", "features.3": "w4a8", "classifier": "w2a8"},
    predicted={"size_ratio": 0.5},
    target="analytical",
)


def quiet_trainer(root: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer that prints little and writes under ``root``."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 4,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "default_root_dir": str(root),
        "callbacks": callbacks,
    }
    settings.update(kwargs)
    return pl.Trainer(**settings)


def no_search(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the callback searched although the plan was known")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("weight")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One QAT fit (search on the analytical target), beside ModelCheckpoint, EarlyStopping and accumulation."""
    root = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    model = TinyCNN()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ohq = OHQCallback(**SEARCH)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, monitor="val_loss")
    trainer = quiet_trainer(
        root,
        [ohq, checkpoint, EarlyStopping(monitor="val_loss", patience=10), FitStartRecorder(str(root))],
        logger=CSVLogger(root),
        enable_checkpointing=True,
        accumulate_grad_batches=2,
        max_steps=4,
        val_check_interval=2,
    )
    trainer.fit(model, image_loader(), image_loader(16, seed=1))
    trainer.save_checkpoint(root / "final.ckpt")  # last.ckpt is from the last validation, before the last step
    model.eval()
    images, _ = random_images(8, seed=2)
    with torch.no_grad():
        reference = model(images)
    test_loss = trainer.test(model, image_loader(16, seed=3), verbose=False)[0]["test_loss"]
    return {
        "root": root,
        "model": model,
        "before": before,
        "callback": ohq,
        "trainer": trainer,
        "last": Path(checkpoint.last_model_path),
        "final": root / "final.ckpt",
        "images": images,
        "reference": reference,
        "test_loss": test_loss,
        "at_fit_start": json.loads((root / "rank0.json").read_text()),
    }


def test_fit_searches_quantizes_and_trains_the_fake_quant_model(trained: dict[str, Any]) -> None:
    model, plan = trained["model"], trained["callback"].plan
    assert plan is not None and plan.predicted["size_ratio"] <= 0.6 + 1e-9
    layers = quantized_layers(model)
    assert layers and {name: layer.option for name, layer in layers.items()} == {
        name: option for name, option in plan.assignment.items() if option != "fp32"
    }
    # the optimizer was built after the swap: it holds the step sizes and trained the very weight Parameters
    start = trained["at_fit_start"]
    assert start["quantized"] == {name: layer.option for name, layer in layers.items()}
    assert start["step_sizes_optimized"]
    assert start["calibrated"] and all(start["calibrated"])  # calibrated in setup, before any step
    for name in layers:
        assert not torch.equal(model.get_submodule(name).weight.detach(), trained["before"][f"{name}.weight"])
    assert trained["trainer"].global_step == 4  # accumulate_grad_batches=2: 8 batches, 4 optimizer steps


def test_fit_logs_the_plan_and_writes_plan_files(trained: dict[str, Any]) -> None:
    trainer, plan = trained["trainer"], trained["callback"].plan
    log_dir = Path(trainer.log_dir)
    assert QuantPlan.from_json(log_dir / "plan.json").assignment == plan.assignment
    table = (log_dir / "plan.md").read_text()
    assert "| layer" in table and "features.0" in table
    with open(log_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    sizes = [row["ohq/size_ratio"] for row in rows if row.get("ohq/size_ratio")]
    assert sizes and float(sizes[0]) == pytest.approx(plan.predicted["size_ratio"])
    assert any(row.get("ohq/latency_ms") for row in rows) and any(row.get("ohq/energy_mj") for row in rows)


def test_checkpoint_state_is_the_plan(trained: dict[str, Any]) -> None:
    stored = torch.load(trained["last"], map_location="cpu", weights_only=True)
    assert stored["callbacks"]["OHQCallback"] == {"plan": trained["callback"].plan.to_dict()}
    assert plan_from_checkpoint(trained["last"]).assignment == trained["callback"].plan.assignment


def test_resume_with_a_new_callback_rebuilds_the_plan_without_search(
    trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(callback_module, "search", no_search)
    resumed = OHQCallback(**SEARCH)  # same settings, no plan: it must come from the checkpoint
    recorder = FitStartRecorder(str(tmp_path))
    trainer = quiet_trainer(tmp_path, [resumed, recorder], max_steps=6)
    model = TinyCNN()
    trainer.fit(model, image_loader(), ckpt_path=trained["last"])
    assert trainer.global_step == 6
    assert resumed.plan.assignment == trained["callback"].plan.assignment
    assert json.loads((tmp_path / "rank0.json").read_text())["step_sizes_optimized"]
    assert {n: layer.option for n, layer in quantized_layers(model).items()} == {
        n: layer.option for n, layer in quantized_layers(trained["model"]).items()
    }


def test_test_from_checkpoint_in_a_fresh_trainer_gives_the_same_outputs(
    trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(callback_module, "search", no_search)
    torch.manual_seed(123)  # different initial weights: everything must come from the checkpoint
    model = TinyCNN()
    trainer = quiet_trainer(tmp_path, [OHQCallback()])
    result = trainer.test(model, image_loader(16, seed=3), ckpt_path=trained["final"], verbose=False)
    assert result[0]["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(trained["images"]), trained["reference"])


@pytest.mark.parametrize("forward", ["keyword argument", "keywords only"])
def test_module_whose_forward_takes_keywords(forward: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    if forward == "keyword argument":  # forward(image, *, temperature): searched on the batch's first value
        model, ohq = KeywordCNN(), OHQCallback(**SEARCH)
    else:  # forward(*, image, temperature): a given plan, inputs passed as keywords by input_fn
        model = KeywordOnlyCNN()
        ohq = OHQCallback(plan={"conv": "w4a8", "classifier": "w8a8"}, input_fn=image_keyword, progress=False)
    before = weights(model)
    trainer = quiet_trainer(tmp_path, [ohq], max_steps=2)
    trainer.fit(model, dict_loader())
    assert set(quantized_layers(model)) == {"conv", "classifier"} - {
        name for name, option in ohq.plan.assignment.items() if option == "fp32"
    }
    assert all(isinstance(model.get_submodule(name), QuantLayer) for name in quantized_layers(model))
    assert not torch.equal(model.conv.weight, before["conv.weight"])


@pytest.mark.parametrize("calibration", ["train", "synthetic"])
def test_finetune_false_calibrates_and_stops(calibration: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    before = weights(model)
    ohq = OHQCallback(plan=HAND_PLAN, finetune=False, calibration=calibration, progress=False)
    trainer = quiet_trainer(tmp_path, [ohq, FitStartRecorder(str(tmp_path))])
    trainer.fit(model, image_loader())
    assert trainer.global_step == 0
    assert set(quantized_layers(model)) == set(HAND_PLAN.assignment)
    assert all(json.loads((tmp_path / "rank0.json").read_text())["calibrated"])
    after = weights(model)
    for name in HAND_PLAN.assignment:
        assert torch.equal(after[f"{name}.module.weight"], before[f"{name}.weight"])
    assert QuantPlan.from_json(tmp_path / "plan.json").assignment == HAND_PLAN.assignment  # no logger: root dir


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"nan_at_batch": 1}, "no fake-quant layer has a non-finite step size or weight"),
        ({"corrupt_at_batch": 1}, r"features\.3 \(input step size\)"),
    ],
)
def test_non_finite_loss_stops_with_a_clear_error(settings: dict[str, int], message: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer = quiet_trainer(tmp_path, [OHQCallback(plan=HAND_PLAN, progress=False)])
    with pytest.raises(QATDivergedError, match=message) as error:
        trainer.fit(TinyCNN(**settings), image_loader())
    assert "global step 1" in str(error.value)


def test_weights_only_checkpoint_needs_the_plan(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    trainer = quiet_trainer(tmp_path, [OHQCallback(plan=HAND_PLAN, progress=False)], max_steps=1)
    trainer.fit(model, image_loader())
    path = tmp_path / "weights.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    with pytest.raises(ValueError, match="save_weights_only"):
        plan_from_checkpoint(path)
    with pytest.raises(ValueError, match="save_weights_only"):
        quiet_trainer(tmp_path, [OHQCallback()]).test(TinyCNN(), image_loader(8), ckpt_path=path, verbose=False)
    fresh = TinyCNN()
    quiet_trainer(tmp_path, [OHQCallback(plan=tmp_path / "plan.json")]).test(
        fresh, image_loader(8), ckpt_path=path, verbose=False
    )
    images, _ = random_images(4, seed=5)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), model(images))


def test_fit_without_a_budget_searches_the_fastest_plan_no_more_sensitive_than_uniform_int8(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    ohq = OHQCallback(synthetic="gaussian", num_samples=4, progress=False)  # minimize="auto", no budget
    quiet_trainer(tmp_path, [ohq], max_steps=1).fit(model, image_loader())
    plan = ohq.plan
    assert plan is not None and plan.meta["sensitivity_budget_from"] == "uniform w8a8"
    int8 = plan.meta["uniform"]["w8a8"]
    assert plan.predicted["sensitivity"] <= int8["sensitivity"] * (1 + 1e-9)
    assert plan.predicted["latency_ms"] <= int8["latency_ms"] * (1 + 1e-9)
    assert {name: layer.option for name, layer in quantized_layers(model).items()} == {
        name: option for name, option in plan.assignment.items() if option != "fp32"
    }


def test_fit_without_a_resource_budget_to_minimise_sensitivity_under_and_unsupported_strategies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(callback_module, "search", no_search)  # refused before any search
    with pytest.raises(ValueError, match="minimize='sensitivity' needs a resource budget"):
        quiet_trainer(tmp_path, [OHQCallback(minimize="sensitivity")]).fit(TinyCNN(), image_loader())
    with pytest.raises(ValueError, match="minimize='sensitivity' needs a resource budget"):
        quiet_trainer(tmp_path, [OHQCallback(minimize="sensitivity", sensitivity_budget=0.5)]).fit(
            TinyCNN(), image_loader()
        )
    for strategy in (FSDPStrategy, DeepSpeedStrategy):
        fake_trainer = type("FakeTrainer", (), {"strategy": object.__new__(strategy), "callbacks": []})()
        with pytest.raises(ValueError, match=f"does not support the {strategy.__name__}"):
            OHQCallback(**SEARCH).setup(fake_trainer, TinyCNN(), "fit")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"compression_ratio": -0.5}, "compression_ratio must be a finite number > 0"),
        ({"compression_ratio": 0}, "compression_ratio must be a finite number > 0"),
        ({"latency_budget": float("nan")}, "latency_budget must be a finite number"),
        ({"sensitivity_budget": -1.0}, "sensitivity_budget must be a finite number >= 0"),
        ({"sensitivity_budget": "w9a8"}, "sensitivity_budget must be a number >= 0 or an option name"),
        ({"target": "tpu-v9"}, "unknown hardware target 'tpu-v9'"),
        ({"target": {"threads": 1}}, "'name'"),
        ({"target": {"name": "analytical", "warp_speed": 9}}, "bad settings for hardware target 'analytical'"),
        ({"target": 3}, "target must be a target name"),
        ({"finetune": "yes"}, "finetune must be True or False"),
        ({"progress": 1}, "progress must be True or False"),
        ({"plan": "/nonexistent/plan.json"}, "does not exist"),
        ({"plan": 42}, "plan must be a QuantPlan"),
        ({"plan": {"layers": []}}, "plan dict is neither a QuantPlan dict"),
        ({"plan": HAND_PLAN, "compression_ratio": 0.5}, "either a plan or budgets"),
        ({"plan": HAND_PLAN, "budgets": Budgets(latency_budget=1.0)}, "either a plan or budgets"),
        ({"plan": HAND_PLAN, "options": ["w8a8"]}, "either a plan or budgets"),
        ({"budgets": Budgets(compression_ratio=0.5), "compression_ratio": 0.4}, "not both: \\['compression_ratio'\\]"),
        ({"search": SearchConfig(seed=1), "num_samples": 2}, "not both: \\['num_samples'\\]"),
        ({"budgets": {"compression_ratio": 0.5}}, "budgets must be a Budgets"),
        ({"search": "fast"}, "search must be a SearchConfig"),
        ({"target": "analytical", "hardware": "cpu"}, "hardware= is the old name of target="),
        ({"example_inputs": torch.zeros(1), "example_input": torch.zeros(1)}, "example_input= is the old name"),
        ({"minimize": "size"}, "minimize must be one of"),
        ({"minimize": "latency", "cost_weight": 1.0}, "cost_weight weighs a cost against sensitivity"),
        ({"tie_groups": "features.0"}, "tie_groups must be a list of lists"),
        ({"refine_rounds": -1}, "refine_rounds must be an integer >= 0"),
        ({"options": ["w9a8"]}, "bits must be between"),
        ({"sensitivity": "hessian"}, "unknown sensitivity method"),
        ({"synthetic": "uniform"}, "unknown synthetic input kind"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1"),
        ({"distill_steps": 0}, "distill_steps must be an integer >= 1"),
        ({"calibration": "val"}, "calibration must be one of"),
        ({"calibration_batches": 2.5}, "calibration_batches must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"example_inputs": "an image"}, "example_inputs must be a tensor"),
        ({"input_fn": "first"}, "input_fn must be a callable"),
        ({"dirpath": 3}, "dirpath must be a file path"),
    ],
)
def test_bad_constructor_arguments(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OHQCallback(**settings)


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'compresion_ratio'"):
        OHQCallback(compresion_ratio=0.5)


def test_keywords_build_the_config_objects_and_objects_are_taken_as_given() -> None:
    loose = OHQCallback(
        compression_ratio=0.6,
        sensitivity_budget="W8A8",
        minimize="sensitivity",
        options=["W4A8", "w8a8"],
        tie_groups=[["features.0", "features.3"]],
        cost_weight=0.5,
        refine_rounds=2,
        seed=3,
    )
    assert loose.budgets == Budgets(compression_ratio=0.6, sensitivity_budget="w8a8")
    assert loose.search_config == SearchConfig(
        minimize="sensitivity",
        options=("w4a8", "w8a8"),
        tie_groups=(("features.0", "features.3"),),
        cost_weight=0.5,
        refine_rounds=2,
        seed=3,
    )
    budgets, config = Budgets(latency_budget=2.0), SearchConfig(num_samples=3)
    given = OHQCallback(budgets=budgets, search=config)
    assert given.budgets is budgets and given.search_config is config
    defaults = OHQCallback()
    assert defaults.budgets == Budgets() and defaults.search_config == SearchConfig()
    assert defaults.search_config.minimize == "auto" and defaults.target.name == "analytical"


def test_old_argument_names_still_work_with_a_deprecation_warning() -> None:
    example = torch.zeros(1, 3, 8, 8)
    with pytest.warns(DeprecationWarning, match=r"OHQCallback\(hardware=\.\.\.\) is deprecated"):
        callback = OHQCallback(hardware={"name": "analytical", "int8_gmacs": 50.0})
    assert callback.target.int8_gmacs == 50.0
    with pytest.warns(DeprecationWarning, match=r"use OHQCallback\(example_inputs=\.\.\.\)"):
        assert OHQCallback(example_input=example).example_inputs is example


def test_the_old_module_and_the_package_give_the_same_names() -> None:
    for name in compat_module.__all__:
        assert getattr(compat_module, name) is getattr(ohq_lightning.lightning, name)
    for name in ("OHQCallback", "QATDivergedError", "plan_from_checkpoint"):
        assert getattr(ohq_lightning, name) is getattr(ohq_lightning.lightning, name)
    assert CALIBRATION_SOURCES == ("train", "synthetic")
    # the package ohq_lightning.lightning does not shadow the third-party lightning
    assert callback_module.pl is pl and pl.__name__ == "lightning.pytorch"
    assert "ohq_lightning" not in Path(pl.__file__).parts


def test_search_settings_reach_the_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def recording_search(*args: Any, **kwargs: Any) -> QuantPlan:
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(callback_module, "search", recording_search)
    callback = OHQCallback(
        target={"name": "analytical", "int8_gmacs": 50.0},
        compression_ratio=0.6,
        num_samples=3,
        distill_steps=7,
        seed=5,
        tie_groups=[["features.0", "features.3"]],
        cost_weight=0.25,
        refine_rounds=1,
    )
    with pytest.raises(RuntimeError, match="stop here"):
        quiet_trainer(tmp_path, [callback]).fit(TinyCNN(), image_loader())
    config = seen["config"]
    assert {key: getattr(config, key) for key in ("num_samples", "distill_steps", "seed", "synthetic")} == {
        "num_samples": 3,
        "distill_steps": 7,
        "seed": 5,
        "synthetic": "distilled",
    }
    assert (config.tie_groups, config.cost_weight, config.refine_rounds) == ((("features.0", "features.3"),), 0.25, 1)
    assert seen["budgets"] == Budgets(compression_ratio=0.6)
    assert seen["target"] is callback.target and seen["target"].int8_gmacs == 50.0
    assert seen["progress"] is False  # Trainer(enable_progress_bar=False): no bars of the callback either


def test_progress_bars_follow_the_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def recording_search(*args: Any, **kwargs: Any) -> QuantPlan:
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(callback_module, "search", recording_search)
    for progress, trainer_bar, expected in ((True, True, True), (False, True, False), (True, False, False)):
        callback = OHQCallback(compression_ratio=0.6, progress=progress)
        with pytest.raises(RuntimeError, match="stop here"):
            quiet_trainer(tmp_path, [callback], enable_progress_bar=trainer_bar).fit(TinyCNN(), image_loader())
        assert seen["progress"] is expected, (progress, trainer_bar)


def test_example_input_array_is_the_default_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def recording_search(model: Any, example_inputs: Any, **kwargs: Any) -> QuantPlan:
        seen.append(example_inputs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(callback_module, "search", recording_search)
    declared, given = torch.full((2, 3, 8, 8), 0.5), torch.full((1, 3, 8, 8), 0.25)
    for example in (None, given):
        model = TinyCNN()
        model.example_input_array = declared
        with pytest.raises(RuntimeError, match="stop here"):
            quiet_trainer(tmp_path, [OHQCallback(compression_ratio=0.6, example_inputs=example)]).fit(
                model, image_loader()
            )
    assert torch.equal(seen[0], declared) and torch.equal(seen[1], given)
    with pytest.raises(RuntimeError, match="stop here"):  # no example anywhere: the first train sample
        quiet_trainer(tmp_path, [OHQCallback(compression_ratio=0.6)]).fit(TinyCNN(), image_loader())
    assert seen[2].shape == (1, 3, 8, 8) and torch.equal(seen[2], next(iter(image_loader()))[0][:1])


def test_dirpath_takes_the_plan_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ohq = OHQCallback(plan=HAND_PLAN, finetune=False, dirpath=out, progress=False)
    trainer = quiet_trainer(tmp_path / "root", [ohq], logger=CSVLogger(tmp_path / "logs"))
    trainer.fit(TinyCNN(), image_loader())
    assert QuantPlan.from_json(out / "plan.json").assignment == HAND_PLAN.assignment
    assert (out / "plan.md").is_file()
    assert not list((tmp_path / "logs").rglob("plan.*")) and not (tmp_path / "root").exists()


def test_constructor_is_keyword_only_and_reads_plan_files(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        OHQCallback("analytical")  # type: ignore[misc]
    path = HAND_PLAN.save(tmp_path / "plan.json")
    assert OHQCallback(plan=path).plan.assignment == HAND_PLAN.assignment
    assert OHQCallback(plan=str(path)).state_dict() == {"plan": QuantPlan.from_json(path).to_dict()}
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match="not a QuantPlan JSON file"):
        OHQCallback(plan=tmp_path / "bad.json")
    assert OHQCallback(target={"name": "analytical", "int8_gmacs": 50.0}).target.int8_gmacs == 50.0


def test_default_input_fn() -> None:
    x = torch.zeros(2, 3)
    assert default_input_fn(x) is x
    assert default_input_fn((x, 1)) is x and default_input_fn([x]) is x
    assert default_input_fn({"image": x, "label": 1}) is x
    with pytest.raises(ValueError, match="input_fn"):
        default_input_fn(7)


def test_ddp_spawn_gives_every_rank_the_plan_searched_on_rank_zero(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ohq = OHQCallback(target=MarkingTarget(marker_dir=str(tmp_path)), **SEARCH)
    trainer = quiet_trainer(
        tmp_path, [ohq, FitStartRecorder(str(tmp_path))], strategy="ddp_spawn", devices=2, max_steps=2
    )
    trainer.fit(TinyCNN(), image_loader())
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["plan"] is not None and ranks[0]["plan"] == ranks[1]["plan"]
    assert ranks[0]["quantized"] == ranks[1]["quantized"] != {}
    assert all(record["step_sizes_optimized"] for record in ranks)
    assert sorted(p.name for p in tmp_path.glob("searched-rank*")) == ["searched-rank0"]


def test_export_onnx_deploys_the_plan_and_logs_its_measured_latency(tmp_path):
    import numpy as np
    import onnx

    from ohq_lightning.deploy import ort_session

    torch.manual_seed(0)
    module = TinyCNN()
    callback = OHQCallback(
        compression_ratio=0.6, synthetic="gaussian", num_samples=4, progress=False, export_onnx="deployed/plan.onnx"
    )
    trainer = quiet_trainer(tmp_path, [callback], max_steps=2, logger=CSVLogger(tmp_path))
    trainer.fit(module, image_loader())
    path = Path(trainer.log_dir) / "deployed" / "plan.onnx"
    graph = onnx.load(path)
    ops = {node.op_type for node in graph.graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    images, _ = random_images(1, seed=3)
    deployed_out = ort_session(graph.SerializeToString(), 1).run(None, {"x": images.numpy()})[0]
    assert deployed_out.shape == (1, 10) and np.isfinite(deployed_out).all()
    metrics = (Path(trainer.log_dir) / "metrics.csv").read_text()
    assert "ohq/onnx_ms" in metrics and "ohq/onnx_int8_ms" in metrics


def test_export_onnx_must_be_a_path():
    with pytest.raises(ValueError, match="export_onnx"):
        OHQCallback(compression_ratio=0.6, export_onnx=3)


PRUNING_EPOCHS = 3  # pruned at the end of each epoch; the masks of epoch 0 hold through the QAT steps after


@pytest.fixture(scope="module", params=["ohq first", "pruning first"])
def pruned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A QAT fit beside ModelPruning (its defaults: every weight and bias, made permanent at the end)."""
    root = tmp_path_factory.mktemp("pruned")
    torch.manual_seed(0)
    model = TinyCNN()
    ohq, recorder = OHQCallback(**SEARCH), PruningRecorder()
    pruning = ModelPruning("l1_unstructured", amount=0.5, verbose=0)  # global: half of all weights and biases
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    callbacks = [ohq, pruning] if request.param == "ohq first" else [pruning, ohq]
    trainer = quiet_trainer(
        root,
        [*callbacks, checkpoint, recorder],
        enable_checkpointing=True,
        accumulate_grad_batches=2,
        max_steps=-1,
        max_epochs=PRUNING_EPOCHS,
    )
    trainer.fit(model, image_loader())
    trainer.save_checkpoint(root / "final.ckpt")
    model.eval()
    images, _ = random_images(8, seed=2)
    with torch.no_grad():
        reference = model(images)
    return {
        "model": model,
        "callback": ohq,
        "trainer": trainer,
        "recorder": recorder,
        "last": Path(checkpoint.last_model_path),
        "final": root / "final.ckpt",
        "images": images,
        "reference": reference,
    }


def test_model_pruning_prunes_the_weights_inside_the_fake_quant_layers(pruned: dict[str, Any]) -> None:
    model, recorder = pruned["model"], pruned["recorder"]
    layers = quantized_layers(model)
    assert layers and pruned["trainer"].global_step == PRUNING_EPOCHS * 2  # 4 batches an epoch, 2 accumulated
    assert recorder.pruned[0] == {}  # ModelPruning prunes at the end of each epoch
    after_first = recorder.pruned[1]
    untouchable = fake_quant_module_names(model)
    assert not set(after_first) & untouchable  # neither the wrappers nor the quantizers' step sizes
    assert all(float((after_first[f"{name}.module"]["weight_mask"] == 0).float().mean()) > 0.2 for name in layers)
    assert {name for name in after_first if name not in {f"{n}.module" for n in layers}} == {"features.1"}  # BN
    masks = [mask for module in after_first.values() for mask in module.values()]
    assert sum(int((mask == 0).sum()) for mask in masks) == round(0.5 * sum(mask.numel() for mask in masks))


def test_the_fake_quant_forward_computes_with_the_pruned_weights(pruned: dict[str, Any]) -> None:
    used = [(epoch, name, weight, mask) for epoch, name, weight, mask in pruned["recorder"].used if epoch >= 1]
    assert len(used) == (PRUNING_EPOCHS - 1) * 4 * len(quantized_layers(pruned["model"]))
    for _, name, weight, mask in used:
        assert mask is not None, name
        pruned_fraction = float((mask == 0).float().mean())
        assert pruned_fraction > 0.2
        assert bool((weight[mask == 0] == 0).all()), name
        assert float((weight == 0).float().mean()) >= pruned_fraction


def test_pruned_weights_stay_zero_through_the_qat_steps(pruned: dict[str, Any]) -> None:
    model, recorder = pruned["model"], pruned["recorder"]
    for name, layer in quantized_layers(model).items():
        assert not is_weight_pruned(layer.module)  # make_pruning_permanent: a plain Parameter again
        assert isinstance(layer.module.weight, torch.nn.Parameter) and not isinstance(layer.weight, torch.nn.Parameter)
        zero = recorder.pruned[1][f"{name}.module"]["weight_mask"] == 0  # pruned at the end of epoch 0
        assert bool((layer.module.weight[zero] == 0).all()) and bool((layer.quantized_weight()[zero] == 0).all())
        for epoch in range(1, PRUNING_EPOCHS):  # within an epoch the QAT steps train the rest, never the pruned
            used = [weight for e, n, weight, _ in recorder.used if e == epoch and n == name]
            assert not torch.equal(used[0], used[-1])
            assert all(bool((weight[zero] == 0).all()) for weight in used)


def test_test_from_a_pruned_checkpoint_in_a_fresh_trainer_gives_the_same_outputs(
    pruned: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(callback_module, "search", no_search)
    torch.manual_seed(123)
    for callbacks in ([OHQCallback()], [OHQCallback(), ModelPruning("l1_unstructured", amount=0.5, verbose=0)]):
        model = TinyCNN()
        trainer = quiet_trainer(tmp_path, callbacks)
        trainer.test(model, image_loader(16, seed=3), ckpt_path=pruned["final"], verbose=False)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(pruned["images"]), pruned["reference"])


def test_resume_beside_model_pruning(pruned: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(callback_module, "search", no_search)
    model = TinyCNN()
    pruning = ModelPruning("l1_unstructured", amount=0.5, verbose=0)
    trainer = quiet_trainer(tmp_path, [OHQCallback(), pruning], accumulate_grad_batches=2, max_steps=-1, max_epochs=4)
    trainer.fit(model, image_loader(), ckpt_path=pruned["last"])
    assert trainer.global_step == 8
    assert {n: layer.option for n, layer in quantized_layers(model).items()} == {
        n: layer.option for n, layer in quantized_layers(pruned["model"]).items()
    }
    # the checkpoint holds the masked weights but no masks (make_pruning_permanent): the new ModelPruning
    # prunes half of all weights and biases again at the end of the resumed epoch
    pruned_parameters = [p for name, p in model.named_parameters() if name.endswith(("weight", "bias"))]
    zeros = sum(int((p == 0).sum()) for p in pruned_parameters)
    assert zeros >= 0.5 * sum(p.numel() for p in pruned_parameters)


def test_non_permanent_pruning_checkpoints_load_resume_and_deploy_the_masked_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = TinyCNN()
    callback = OHQCallback(**SEARCH, export_onnx="plan.onnx")
    pruning = ModelPruning("l1_unstructured", amount=0.5, make_pruning_permanent=False, verbose=0)
    trainer = quiet_trainer(tmp_path / "fit", [callback, pruning], max_steps=-1, max_epochs=2)
    trainer.fit(model, image_loader())
    layers = quantized_layers(model)
    assert all(is_weight_pruned(layer.module) for layer in layers.values())
    graph = onnx.load(tmp_path / "fit" / "plan.onnx")
    int8_weights = [numpy_helper.to_array(t) for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    deployed = {w.size: w for w in int8_weights if w.ndim >= 2}  # the three layers differ in size
    assert len(deployed) == len(layers)
    for layer in layers.values():  # deployed as the masked values: zero where pruned
        mask = layer.module.weight_mask.numpy()
        weight = deployed[mask.size]
        weight = weight if weight.shape == mask.shape else weight.T
        assert (weight[mask == 0] == 0).all()

    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    keys = torch.load(tmp_path / "pruned.ckpt", weights_only=True)["state_dict"]
    assert "features.0.module.weight_orig" in keys and "features.0.module.weight" not in keys
    model.eval()
    images, _ = random_images(8, seed=2)
    with torch.no_grad():
        reference = model(images)

    monkeypatch.setattr(callback_module, "search", no_search)
    torch.manual_seed(123)
    fresh = TinyCNN()
    quiet_trainer(tmp_path / "test", [OHQCallback()]).test(
        fresh, image_loader(16, seed=3), ckpt_path=tmp_path / "pruned.ckpt", verbose=False
    )
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), reference)
    assert all(is_weight_pruned(layer.module) for layer in quantized_layers(fresh).values())

    resumed = TinyCNN()
    pruning = ModelPruning("l1_unstructured", amount=0.5, make_pruning_permanent=False, verbose=0)
    trainer = quiet_trainer(tmp_path / "resume", [pruning, OHQCallback()], max_steps=-1, max_epochs=3)
    trainer.fit(resumed, image_loader(), ckpt_path=tmp_path / "pruned.ckpt")  # the optimizer state loads too
    assert trainer.global_step == 12
    for name, layer in quantized_layers(resumed).items():
        before = layers[name].module.weight_mask == 0
        assert bool((layer.module.weight_mask[before] == 0).all())
        assert bool((layer.quantized_weight()[before] == 0).all())
        assert int((layer.module.weight_mask == 0).sum()) > int(before.sum()), name  # and pruned further


def test_model_pruning_default_choice_skips_the_wrappers_and_quantizers() -> None:
    module = TinyCNN()
    apply_plan(module, HAND_PLAN)
    chosen = ModelPruning.sanitize_parameters_to_prune(module, (), parameter_names=["weight", "bias"])
    names = {id(m): name for name, m in module.named_modules()}
    chosen_names = {(names[id(m)], p) for m, p in chosen}
    assert not {name for name, _ in chosen_names} & fake_quant_module_names(module)
    for name in HAND_PLAN.assignment:
        assert {(f"{name}.module", "weight"), (f"{name}.module", "bias")} <= chosen_names


def test_qat_on_a_module_in_eval_mode_warns(tmp_path):
    callback = OHQCallback(compression_ratio=0.6, synthetic="gaussian", num_samples=4, progress=False)
    trainer = quiet_trainer(tmp_path, [callback], max_steps=1)
    with pytest.warns(UserWarning, match="eval mode"):
        trainer.fit(TinyCNN().eval(), image_loader())
