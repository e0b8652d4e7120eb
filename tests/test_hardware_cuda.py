"""The measured CUDA target: everything but the GPU timing runs here, on the CPU, with a scripted timer."""

import dataclasses
import itertools
import json
import math
import sys
import time
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import make_tiny_net
from omegaconf import OmegaConf
from torch import nn

import ohq_lightning as ohq
from ohq_lightning._util.timing import Timing, TimingSettings
from ohq_lightning.hardware import CUDATarget, NvmlEnergyMeter, create_target, known_targets
from ohq_lightning.hardware.cuda import (
    CUDA_OPTIONS,
    DeviceInfo,
    Kernel,
    check_options,
    implementations,
    kernel_of,
    layer_kernels,
    synchronized_timer,
    transition_kernels,
)
from ohq_lightning.hardware.cuda import kernels as cuda_kernels
from ohq_lightning.hardware.cuda import profiling as cuda_profiling
from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import CostTable, LayerInfo, SensitivityTable

QUICK = TimingSettings(warmup=1, min_repeats=3, max_repeats=20, max_seconds=0.05, rel_spread=0.05)
GPU = DeviceInfo("Scripted GPU", (9, 0), torch.__version__, "13.0", 92400)


class PointNet(nn.Module):
    """A 3x3 conv, a 1x1 conv (two int8 implementations), a depthwise conv (none) and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.point = nn.Conv2d(16, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.point(torch.relu(self.stem(x))))
        return self.fc(torch.relu(self.dw(x)).mean((2, 3)))


@pytest.fixture
def point_net():
    torch.manual_seed(0)
    model = PointNet().eval()
    example = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return model, example, trace_layers(model, example).layers


def linear(k: int, n: int, tokens: int | None = None, bias: bool = True) -> LayerInfo:
    shape = [1, k] if tokens is None else [1, tokens, k]
    return LayerInfo("fc", "Linear", "linear", shape, [*shape[:-1], n], [n, k], n * k, n if bias else 0, n * k)


def conv(ci: int, co: int, k: int = 1, s: int = 1, p: int = 0, hw: int = 8, groups: int = 1, pads=None) -> LayerInfo:
    pads = pads or [p, p, p, p]
    ho = (hw + pads[0] + pads[2] - k) // s + 1
    kind = "conv" if groups == 1 else "depthwise" if groups == ci else "grouped"
    weight = [co, ci // groups, k, k]
    macs = co * ho * ho * math.prod(weight[1:])
    return LayerInfo(
        "c", "Conv2d", kind, [1, ci, hw, hw], [1, co, ho, ho], weight, math.prod(weight), co, macs,
        groups=groups, stride=[s, s], padding=list(pads),
    )  # fmt: skip


class ScriptedTimer:
    """Times nothing: runs each kernel once (so it must run) and returns a fixed time per kernel."""

    KERNEL_MS: ClassVar[dict[str, float]] = {
        "fp32": 1.0,
        "fp16": 0.5,
        "bf16": 0.6,
        "int8": 0.3,
        "fp8": 0.2,
        "network": 10.0,
    }
    IMPL_FACTOR: ClassVar[dict[str, float]] = {"torch._int_mm": 1.0, "torch.ops.quantized.conv2d": 2.0}

    def __init__(self, network_ms: float = 10.0) -> None:
        self.network_ms = network_ms
        self.calls: list[list[Kernel]] = []

    @staticmethod
    def transition_ms(kernel: Kernel) -> float:
        numel = math.prod(kernel.detail["shape"])
        return {"quantize": 1e-4, "dequantize": 1e-5}.get(kernel.name, 1e-6) * numel

    def ms(self, kernel: Kernel) -> float:
        if kernel.name == "network":
            return self.network_ms
        if kernel.impl == "eager":
            return self.transition_ms(kernel)
        return self.KERNEL_MS[kernel.name] * self.IMPL_FACTOR.get(kernel.impl, 1.0)

    def __call__(self, kernels, settings):
        assert settings == QUICK
        self.calls.append(list(kernels))
        for kernel in kernels:
            kernel.run()
        return [Timing(self.ms(kernel), 0.01, 5) for kernel in kernels]


def target(tmp_path, **kwargs) -> CUDATarget:
    return CUDATarget(timing=QUICK, cache_dir=tmp_path, progress=False, **kwargs)


# --- options ---------------------------------------------------------------------------------------


def test_options_map_to_the_kernels_they_run_on():
    assert [kernel_of(name) for name in ("fp32", "FP16", "bf16", "w8a8", "w4a8", "w2a8", "fp8")] == [
        "fp32", "fp16", "bf16", "int8", "int8", "int8", "fp8",
    ]  # fmt: skip
    assert check_options(["FP16", "w8a8"]) == ("fp16", "w8a8")
    for refused in ("w8", "w4a4", "w8a4"):
        with pytest.raises(ValueError, match="cannot run on the cuda target"):
            kernel_of(refused)
    with pytest.raises(ValueError, match="listed twice"):
        check_options(["fp16", "FP16"])
    with pytest.raises(ValueError, match="at least one"):
        check_options([])


def test_fp8_needs_a_recent_gpu_and_a_plan_format_that_names_it():
    with pytest.raises(ValueError, match=r"compute capability 8\.9 or newer .*sm_80"):
        check_options(["fp32", "fp8"], capability=(8, 0))
    with pytest.raises(ValueError, match=r"plan format \(ohq_lightning\.plan\.Option\) has no 8-bit float"):
        check_options(["fp32", "fp8"], capability=(9, 0))
    with pytest.raises(ValueError, match="cannot be planned yet"):
        CUDATarget(options=("fp16", "fp8"))


# --- construction, configs and the missing GPU -------------------------------------------------------


def test_the_target_builds_without_a_gpu_and_is_registered():
    built = create_target("cuda", options=["fp16", "w8a8"])
    assert isinstance(built, CUDATarget) and built.name == "cuda" and built.options == ("fp16", "w8a8")
    assert CUDATarget().options == CUDA_OPTIONS == ("fp32", "fp16", "bf16", "w8a8")
    assert "cuda" in known_targets()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": -1}, "device must be"),
        ({"device": True}, "device must be"),
        ({"batch_size": 0}, "batch_size"),
        ({"min_sample_ms": 0}, "min_sample_ms"),
        ({"energy_seconds": -1.0}, "energy_seconds"),
        ({"options": ("w8",)}, "cannot run on the cuda target"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CUDATarget(**kwargs)


def test_costs_without_a_cuda_device_is_a_clear_error(monkeypatch, point_net):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, _, layers = point_net
    with pytest.raises(RuntimeError, match=r"^no CUDA device: torch\.cuda\.is_available\(\) is False"):
        CUDATarget().costs(layers)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match=r"^no CUDA device: device=3 asked for, but torch sees 1"):
        CUDATarget(device=3).costs(layers)


def test_the_hydra_config_builds_the_default_cuda_target():
    config = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "hardware" / "cuda.yaml"))
    built = create_target(config.pop("name"), **config)
    assert built == CUDATarget()  # the config spells out the defaults


# --- which implementations exist ---------------------------------------------------------------------


def test_int8_implementations_follow_what_torch_has():
    builders, reasons = implementations(linear(64, 32), "int8")
    assert list(builders) == ["torch._int_mm"] and reasons == {}
    builders, _ = implementations(conv(16, 32, k=1), "int8")  # a 1x1 conv is a matmul and a conv
    assert list(builders) == ["torch._int_mm", "torch.ops.quantized.conv2d"]
    builders, _ = implementations(conv(16, 32, k=3, p=1), "int8")
    assert list(builders) == ["torch.ops.quantized.conv2d"]
    for grouped in (conv(16, 16, k=3, p=1, groups=16), conv(16, 32, k=1, groups=2)):
        builders, reasons = implementations(grouped, "int8")
        assert builders == {} and "limited to groups=1" in reasons["*"]
    builders, reasons = implementations(conv(16, 16, k=3, s=2, pads=[0, 0, 1, 1]), "int8")  # 'same' padding
    assert builders == {} and "symmetric padding only" in reasons["torch.ops.quantized.conv2d"]


def test_fp8_and_float_implementations():
    assert list(implementations(linear(64, 10), "fp8")[0]) == ["torch._scaled_mm"]
    assert "multiple of 16 (K=24)" in implementations(linear(24, 16), "fp8")[1]["torch._scaled_mm"]
    assert "no fp8 convolution" in implementations(conv(16, 16, k=3, p=1), "fp8")[1]["*"]
    assert list(implementations(conv(16, 16, k=3, p=1, groups=16), "fp16")[0]) == ["F.conv2d"]
    assert list(implementations(linear(16, 10), "bf16")[0]) == ["F.linear"]
    with pytest.raises(ValueError, match="unknown kernel"):
        implementations(linear(16, 10), "int4")


# --- the kernels compute the layer -------------------------------------------------------------------


def test_int8_matmul_pads_small_shapes_and_computes_the_layer():
    (kernel,), reasons = layer_kernels(linear(16, 10), "int8")  # 1 row, N=10: padded for cuBLASLt
    assert reasons == {} and kernel.impl == "torch._int_mm"
    assert kernel.detail["input_padded_to"] == [32, 16] and kernel.detail["output_channels_padded_to"] == 16
    assert kernel.detail["relative_error"] < 0.03
    out = kernel.run()
    assert out.dtype == torch.int8 and out.shape == (32, 16)
    (kernel,), _ = layer_kernels(linear(64, 32, tokens=30), "int8", batch=2)  # 60 rows: no padding
    assert "input_padded_to" not in kernel.detail and kernel.run().shape == (60, 32)


def test_int8_convolutions_compute_the_layer_in_both_implementations():
    strided = conv(16, 24, k=1, s=2, hw=9)
    kernels, reasons = layer_kernels(strided, "int8", batch=2)
    assert [k.impl for k in kernels] == ["torch._int_mm", "torch.ops.quantized.conv2d"] and reasons == {}
    assert all(k.detail["relative_error"] < 0.03 for k in kernels)
    assert kernels[0].run().shape == (2 * 5 * 5, 24)  # NHWC rows of the strided output
    assert kernels[1].detail["weight_scale"] == "per tensor"
    (kernel,), _ = layer_kernels(conv(8, 16, k=3, s=2, p=1, hw=9), "int8")
    assert kernel.detail["relative_error"] < 0.03 and kernel.run().shape == (1, 16, 5, 5)


def test_fp8_and_half_kernels_compute_the_layer():
    (kernel,), _ = layer_kernels(conv(16, 24, k=1), "fp8")
    assert kernel.detail["output_channels_padded_to"] == 32 and kernel.detail["relative_error"] < 0.01
    assert kernel.run().dtype == torch.float32
    for half, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        (kernel,), _ = layer_kernels(conv(8, 8, k=3, p=1, groups=8), half)
        assert kernel.run().dtype == dtype and kernel.detail["relative_error"] < 0.05


def test_a_kernel_that_fails_or_computes_something_else_is_not_timed(monkeypatch):
    real = cuda_kernels._build_int_mm

    def wrong(ops):
        built = real(ops)
        built.run = lambda run=built.run: torch.zeros_like(run())
        return built

    monkeypatch.setattr(cuda_kernels, "_build_int_mm", wrong)
    kernels, reasons = layer_kernels(linear(16, 16), "int8")
    assert kernels == [] and "off the float reference by 100.0%" in reasons["torch._int_mm"]

    def failing(ops):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul\nmore text")

    monkeypatch.setattr(cuda_kernels, "_build_int_mm", failing)
    kernels, reasons = layer_kernels(linear(16, 16), "int8")
    assert (
        reasons["torch._int_mm"]
        == "failed on cpu: RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul"
    )


def test_transition_kernels_change_precision_at_the_layers_own_shapes():
    layer = conv(8, 16, k=3, s=2, p=1, hw=9)
    kernels = {k.name: k for k in transition_kernels(layer, batch=2, halves=("fp16",))}
    assert set(kernels) == {"quantize", "dequantize", "cast_in:fp16", "cast_out:fp16"}
    quantized = kernels["quantize"].run()
    assert quantized.dtype == torch.int8 and quantized.shape == (2, 9, 9, 8) and quantized.is_contiguous()  # NHWC
    dequantized = kernels["dequantize"].run()
    assert dequantized.dtype == torch.float32 and dequantized.shape == (2, 16, 5, 5)
    assert kernels["cast_in:fp16"].run().dtype == torch.float16 and kernels["cast_in:fp16"].detail["shape"] == [
        2,
        8,
        9,
        9,
    ]
    assert kernels["quantize"].key == "quantize|nchw->nhwc|2x8x9x9"
    assert [k.name for k in transition_kernels(linear(16, 10), integer=False)] == []
    assert transition_kernels(linear(16, 10))[0].run().shape == (1, 16)


# --- the cost table ----------------------------------------------------------------------------------


def test_measure_on_assembles_a_cost_table_from_the_timings(point_net, tmp_path):
    model, example, layers = point_net
    timer = ScriptedTimer(network_ms=10.0)
    table = target(tmp_path).measure_on(
        layers, device="cpu", info=GPU, timer=timer, model=model, example_inputs=example
    )
    names = [layer.name for layer in layers]
    assert names == ["stem", "point", "dw", "fc"] and table.target == "cuda"
    assert table.options == ["fp32", "fp16", "bf16", "w8a8"] and table.meta["batch_size"] == 2
    parts = {
        name: {part: ScriptedTimer.transition_ms(k) for k in transition_kernels(layer, batch=2) for part in [k.name]}
        for name, layer in zip(names, layers, strict=True)
    }
    for layer in layers:
        row = table.costs[layer.name]
        assert row["fp32"].latency_ms == 1.0 and row["fp16"].latency_ms == 0.5 and row["bf16"].latency_ms == 0.6
        assert {row[o].source for o in ("fp32", "fp16", "bf16")} == {"measured"}
        assert row["fp32"].energy_mj is None  # not asked for: absent, never invented
    # int8: the faster implementation counts; entering int8 at the first layer and leaving it at the last are added
    assert table.meta["implementations"]["point"]["int8"] == "torch._int_mm"
    assert table.meta["implementations"]["stem"]["int8"] == "torch.ops.quantized.conv2d"
    assert table.costs["stem"]["w8a8"].latency_ms == pytest.approx(0.6 + parts["stem"]["quantize"])
    assert table.costs["point"]["w8a8"].latency_ms == pytest.approx(0.3)
    assert table.costs["fc"]["w8a8"].latency_ms == pytest.approx(0.3 + parts["fc"]["dequantize"])
    # the depthwise conv has no int8 kernel: unsupported, with the reason
    dw = table.costs["dw"]["w8a8"]
    assert dw.source == "unsupported" and dw.latency_ms is None and dw.weight_bytes == 16 * 9
    assert "limited to groups=1" in table.meta["unsupported"]["dw"]["w8a8"]
    assert set(table.meta["unsupported"]) == {"dw"}
    # transitions: half of (quantize of the next input + dequantize of this output)
    for here, after in itertools.pairwise(names):
        expected = (parts[after]["quantize"] + parts[here]["dequantize"]) / 2
        assert table.transition_ms[here] == pytest.approx(expected)
    assert set(table.transition_ms) == set(names[:-1])
    # the rest of the network: the whole fp32 network minus its layers' fp32 entries
    assert table.base_latency_ms == pytest.approx(10.0 - 4 * 1.0)
    assert table.meta["base"]["network_fp32_ms"] == 10.0
    all_fp32 = dict.fromkeys(names, "fp32")
    assert table.predicted_latency_ms(all_fp32) == pytest.approx(10.0)  # the measured network, by construction
    assert set(table.meta["float_cast_ms"]["stem"]) == {"fp16", "bf16"}
    assert "not measured (energy=False" in table.meta["energy"]
    json.loads(table.to_json())  # plain data


def test_sub_8_bit_options_share_the_int8_timing_and_layers_called_twice_cost_twice(point_net, tmp_path):
    _, _, layers = point_net
    layers = [*layers[:1], dataclasses.replace(layers[1], calls=2), *layers[2:]]
    table = target(tmp_path, options=("w8a8", "w4a8")).measure_on(layers, device="cpu", info=GPU, timer=ScriptedTimer())
    row = table.costs["point"]
    assert row["w4a8"].latency_ms == row["w8a8"].latency_ms == pytest.approx(2 * 0.3)
    assert row["w4a8"].weight_bytes == row["w8a8"].weight_bytes / 2
    assert table.meta["float_cast_ms"] == {}  # no float option, no casts
    assert CostTable.from_json(table.to_json()).costs == table.costs


def test_without_the_model_the_rest_of_the_network_is_not_modelled(point_net, tmp_path):
    model, example, layers = point_net
    table = target(tmp_path).measure_on(layers, device="cpu", info=GPU, timer=ScriptedTimer())
    assert table.base_latency_ms is None and "not modelled" in table.meta["base"]["note"]
    assert table.meta["batch_size"] == 1  # no example input, no batch_size: batch 1
    slower = ScriptedTimer(network_ms=3.0)  # faster than its layers alone: no remainder can be told apart
    table = target(tmp_path).measure_on(
        layers, device="cpu", info=GPU, timer=slower, model=model, example_inputs=example
    )
    assert table.base_latency_ms is None and "not used" in table.meta["base"]["note"]
    table = target(tmp_path, batch_size=4).measure_on(
        layers, device="cpu", info=GPU, timer=ScriptedTimer(), model=model, example_inputs=example
    )
    assert table.base_latency_ms is None and "differs from batch_size" in table.meta["base"]["note"]
    assert table.meta["batch_size"] == 4


def test_float_only_options_have_no_transitions_and_fp32_is_timed_for_the_base(point_net, tmp_path):
    model, example, layers = point_net
    timer = ScriptedTimer()
    table = target(tmp_path, options=("fp16",)).measure_on(
        layers, device="cpu", info=GPU, timer=timer, model=model, example_inputs=example
    )
    assert table.transition_ms == {} and table.options == ["fp16"]
    assert table.base_latency_ms == pytest.approx(10.0 - 4 * 1.0)  # fp32 timed for the base, not offered
    assert {k.name for call in timer.calls for k in call} == {"fp16", "fp32", "network"}


def test_measurements_are_cached_per_gpu_and_layer(point_net, tmp_path):
    _, _, layers = point_net
    first = ScriptedTimer()
    cold = target(tmp_path).measure_on(layers, device="cpu", info=GPU, timer=first)
    assert cold.meta["measured_now"] > 0 and cold.meta["from_cache"] == 0
    fingerprint = json.loads(Path(cold.meta["cache_file"]).read_text())["fingerprint"]
    assert fingerprint["gpu"] == "Scripted GPU" and fingerprint["capability"] == "9.0"
    assert fingerprint["torch"] == torch.__version__ and fingerprint["cuda"] == "13.0" and "tf32" in fingerprint
    again = ScriptedTimer()
    warm = target(tmp_path).measure_on(layers, device="cpu", info=GPU, timer=again)
    assert again.calls == [] and warm.meta["measured_now"] == 0 and warm.meta["from_cache"] == cold.meta["measured_now"]
    assert warm.costs == cold.costs and warm.transition_ms == cold.transition_ms
    forced = ScriptedTimer()
    target(tmp_path, force=True).measure_on(layers, device="cpu", info=GPU, timer=forced)
    assert len(forced.calls) == len(layers)
    other_gpu = DeviceInfo("Other GPU", (8, 0), torch.__version__, "13.0", 92400)
    elsewhere = target(tmp_path).measure_on(layers, device="cpu", info=other_gpu, timer=ScriptedTimer())
    assert elsewhere.meta["cache_file"] != cold.meta["cache_file"] and elsewhere.meta["measured_now"] > 0
    assert elsewhere.meta["device"]["name"] == "Other GPU"


def test_fp8_is_refused_on_an_old_gpu_when_measuring(point_net, tmp_path):
    _, _, layers = point_net
    old = DeviceInfo("Old GPU", (8, 0), torch.__version__, "13.0", 92400)
    with pytest.raises(ValueError, match=r"compute capability 8\.9"):
        target(tmp_path).measure_on(layers, ["fp16", "fp8"], device="cpu", info=old, timer=ScriptedTimer())


class FakeNvml:
    """NVML's energy counter, as a module: each call of the measured function adds ``per_call`` mJ."""

    def __init__(self, per_call: float = 3.0, readable: bool = True) -> None:
        self.per_call, self.readable = per_call, readable
        self.energy_mj, self.open = 1000.0, 0

    def nvmlInit(self):
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.readable:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return int(self.energy_mj)

    def work(self):
        self.energy_mj += self.per_call


def test_nvml_energy_meter_reads_the_counter_per_call():
    nvml = FakeNvml(per_call=3.0)
    synced = []
    with NvmlEnergyMeter(0, nvml=nvml, min_seconds=0.005) as meter:
        assert meter.available and meter.reason is None and nvml.open == 1
        assert meter.measure_mj(nvml.work, synchronize=lambda: synced.append(1)) == pytest.approx(3.0)
        assert synced  # GPU work is synchronised before the counter is read
    assert nvml.open == 0 and not meter.available and meter.measure_mj(nvml.work) is None
    meter.close()  # twice is fine
    idle = NvmlEnergyMeter(0, nvml=FakeNvml(per_call=0.0), min_seconds=0.002)
    assert idle.measure_mj(lambda: None) is None  # the counter never moved: no figure, not zero


def test_nvml_energy_meter_says_why_it_cannot_measure(monkeypatch):
    unreadable = FakeNvml(readable=False)
    meter = NvmlEnergyMeter(1, nvml=unreadable)
    assert not meter.available and "not readable on GPU 1" in meter.reason and unreadable.open == 0
    monkeypatch.setitem(sys.modules, "pynvml", None)  # the nvidia-ml-py package is not installed
    meter = NvmlEnergyMeter(0)
    assert not meter.available and "nvidia-ml-py" in meter.reason and meter.measure_mj(lambda: None) is None
    broken = types.SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(OSError("libnvidia-ml.so.1 not found")))
    assert "did not initialise: OSError: libnvidia-ml.so.1" in NvmlEnergyMeter(0, nvml=broken).reason


def test_energy_goes_into_the_table_where_the_counter_is_readable(point_net, tmp_path):
    _, _, layers = point_net
    nvml = FakeNvml(per_call=2.0)
    meter = NvmlEnergyMeter(0, nvml=nvml, min_seconds=0.002)
    # each call of a kernel costs 2 mJ on the fake counter: wrap the runs so that they spend it
    original = cuda_profiling.probe

    def probe_with_energy(*args, **kwargs):
        made = original(*args, **kwargs)
        if isinstance(made, str):
            return made
        return Kernel(made.name, made.impl, made.key, lambda run=made.run: (nvml.work(), run())[1], made.detail)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_profiling, "probe", probe_with_energy)
        table = target(tmp_path, options=("fp32", "w8a8"), energy=True).measure_on(
            layers, device="cpu", info=GPU, timer=ScriptedTimer(), energy_meter=meter
        )
    assert table.costs["stem"]["fp32"].energy_mj == pytest.approx(2.0)
    assert table.costs["dw"]["w8a8"].energy_mj is None  # no kernel, no energy
    assert table.meta["energy"].startswith("measured: NVML")
    unavailable = NvmlEnergyMeter(0, nvml=FakeNvml(readable=False))
    table = target(tmp_path, options=("fp32",), energy=True).measure_on(
        layers, device="cpu", info=GPU, timer=ScriptedTimer(), energy_meter=unavailable
    )
    assert table.costs["stem"]["fp32"].energy_mj is None and "NVML_ERROR_NOT_SUPPORTED" in table.meta["energy"]


# --- the timer and the solver ------------------------------------------------------------------------


def test_the_synchronized_timer_times_per_call_and_synchronizes_every_sample():
    calls = {"fast": 0, "slow": 0, "sync": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        time.sleep(0.002)

    timer = synchronized_timer(lambda: calls.__setitem__("sync", calls["sync"] + 1), min_sample_ms=2.0)
    quick, slept = timer([Kernel("a", "x", "a", fast), Kernel("b", "x", "b", slow)], QUICK)
    assert slept.median_ms >= 2.0 * 0.95 and quick.median_ms < slept.median_ms
    assert calls["fast"] > 10 * calls["slow"]  # many calls of the fast kernel per sample, one of the slow
    assert calls["sync"] >= 2 * slept.repeats  # every sample of both ends with a synchronize
    with pytest.raises(ValueError, match="min_sample_ms"):
        synchronized_timer(min_sample_ms=0)


def test_a_plan_solved_on_the_cuda_table_predicts_what_the_table_says(point_net, tmp_path):
    model, example, layers = point_net
    table = target(tmp_path).measure_on(
        layers, device="cpu", info=GPU, timer=ScriptedTimer(), model=model, example_inputs=example
    )
    names = [layer.name for layer in layers]
    scores = {name: {"fp32": 0.0, "fp16": 0.01, "bf16": 0.02, "w8a8": 0.1} for name in names}
    sensitivity = SensitivityTable("scripted", scores)
    plan = ohq.solve(sensitivity, table, options=["fp32", "fp16"], latency_budget=8.0)
    assert plan.predicted["latency_ms"] == pytest.approx(table.predicted_latency_ms(plan.assignment))
    assert plan.predicted["latency_ms"] <= 8.0 and list(plan.assignment.values()).count("fp16") == 4
    # the depthwise conv cannot run w8a8: a latency budget works over the other options, never picking it
    fast = ohq.solve(sensitivity, table, latency_budget=8.0)
    assert fast.assignment["dw"] != "w8a8" and fast.predicted["latency_ms"] <= 8.0
    assert fast.predicted["latency_ms"] == pytest.approx(table.predicted_latency_ms(fast.assignment))
    with pytest.raises(ValueError, match="layer 'dw' has no supported option"):
        ohq.solve(sensitivity, table, options=["w8a8"], latency_budget=8.0)
    sized = ohq.solve(sensitivity, table, compression_ratio=2.0)  # a size budget needs no latency
    assert set(sized.assignment) == set(names)


# --- the real thing, where a GPU exists --------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_target_measures_a_tiny_network_on_the_gpu(tmp_path):
    model = make_tiny_net()
    example = torch.randn(1, 3, 16, 16)
    layers = trace_layers(model, example).layers
    table = CUDATarget(timing=QUICK, cache_dir=tmp_path, progress=False).costs(
        layers, model=model, example_inputs=example
    )
    assert table.meta["device"]["name"] == torch.cuda.get_device_name(0)
    for layer in layers:
        row = table.costs[layer.name]
        for option in ("fp32", "fp16", "bf16"):
            assert row[option].source == "measured" and row[option].latency_ms > 0
        assert (row["w8a8"].source == "measured" and row["w8a8"].latency_ms > 0) or (
            row["w8a8"].source == "unsupported" and table.meta["unsupported"][layer.name]["w8a8"]
        )
    assert table.costs["dw.0"]["w8a8"].source == "unsupported"  # depthwise: no int8 kernel in torch
    assert all(value >= 0 for value in table.transition_ms.values())
    assert table.base_latency_ms is None or table.base_latency_ms >= 0
    assert next(model.parameters()).device.type == "cpu"  # the caller's model was not moved
    gpu = CUDATarget(timing=QUICK, cache_dir=tmp_path, progress=False)
    plan = ohq.search(
        model,
        example,
        target=gpu,
        options=["fp32", "fp16"],
        latency_budget=1e3,
        num_samples=2,
        distill_steps=1,
        progress=False,
    )
    assert plan.target == "cuda" and "latency_ms" in plan.predicted
