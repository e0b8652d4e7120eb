import pytest
import torch
from conftest import make_tiny_net, same_state, state_snapshot
from torch import nn

from ohq_lightning.sensitivity import distilled_inputs, gaussian_inputs, model_fingerprint, synthetic_inputs
from ohq_lightning.sensitivity.synthetic import _bn_layers


def _bn_mismatch(model: nn.Module, inputs: torch.Tensor) -> float:
    stats = []

    def hook(module, args, _out):
        x = args[0]
        mean = x.mean(dim=(0, 2, 3))
        std = x.var(dim=(0, 2, 3), unbiased=False).add(module.eps).sqrt()
        target = module.running_var.add(module.eps).sqrt()
        stats.append(float((mean - module.running_mean).abs().mean() + (std - target).abs().mean()))

    handles = [bn.register_forward_hook(hook) for bn in _bn_layers(model)]
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return sum(stats)


def test_gaussian_inputs_are_seeded_and_shaped(tiny_input):
    a = gaussian_inputs(tiny_input, 5, seed=1)
    assert a.shape == (5, 3, 16, 16)
    assert torch.equal(a, gaussian_inputs(tiny_input, 5, seed=1))
    assert not torch.equal(a, gaussian_inputs(tiny_input, 5, seed=2))


def test_distilled_inputs_match_batchnorm_statistics_better_and_leave_the_model_alone(tiny_net, tiny_input):
    tiny_net.train()
    before = state_snapshot(tiny_net)
    start = gaussian_inputs(tiny_input, 8, seed=0)
    distilled = distilled_inputs(tiny_net, tiny_input, 8, steps=30, seed=0, cache_dir=False, progress=False)
    assert distilled.shape == start.shape and torch.isfinite(distilled).all()
    tiny_net.eval()
    assert _bn_mismatch(tiny_net, distilled) < 0.15 * _bn_mismatch(tiny_net, start)  # measured: 0.050
    assert same_state(tiny_net, before)
    assert all(p.requires_grad for p in tiny_net.parameters())


def test_distilled_inputs_are_deterministic_and_cached(tiny_net, tiny_input, tmp_path):
    first = distilled_inputs(tiny_net, tiny_input, 4, steps=5, cache_dir=tmp_path, progress=False)
    files = list((tmp_path / "synthetic").glob("*.npy"))
    assert len(files) == 1
    again = distilled_inputs(tiny_net, tiny_input, 4, steps=5, cache_dir=tmp_path, progress=False)
    assert torch.equal(first, again)
    fresh = distilled_inputs(tiny_net, tiny_input, 4, steps=5, cache_dir=False, progress=False)
    assert torch.allclose(first, fresh, atol=1e-5)
    other_model = distilled_inputs(make_tiny_net(seed=1), tiny_input, 4, steps=5, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "synthetic").glob("*.npy"))) == 2 and not torch.equal(first, other_model)


def test_a_corrupt_cache_is_rebuilt(tiny_net, tiny_input, tmp_path):
    first = distilled_inputs(tiny_net, tiny_input, 4, steps=5, cache_dir=tmp_path, progress=False)
    (path,) = (tmp_path / "synthetic").glob("*.npy")
    path.write_bytes(b"not a numpy file")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = distilled_inputs(tiny_net, tiny_input, 4, steps=5, cache_dir=tmp_path, progress=False)
    assert torch.allclose(first, rebuilt, atol=1e-5)
    assert torch.allclose(torch.from_numpy(__import__("numpy").load(path)), rebuilt)


def test_a_model_without_batchnorm_falls_back_to_gaussian_with_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    example = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="no BatchNorm"):
        inputs = distilled_inputs(model, example, 3, cache_dir=False, progress=False)
    assert torch.equal(inputs, gaussian_inputs(example, 3))


def test_unknown_kind_is_rejected(tiny_net, tiny_input):
    with pytest.raises(ValueError, match="gaussian"):
        synthetic_inputs(tiny_net, tiny_input, kind="uniform")


def test_the_fingerprint_hashes_every_dtype_including_bfloat16():
    model = make_tiny_net().to(torch.bfloat16)
    first = model_fingerprint(model)
    assert first == model_fingerprint(make_tiny_net().to(torch.bfloat16))
    with torch.no_grad():
        model.fc.weight[0, 0] += 1
    assert model_fingerprint(model) != first
    assert model_fingerprint(make_tiny_net()) != first  # the float32 twin differs


def test_the_fingerprint_of_float32_models_is_unchanged():
    model = nn.Linear(2, 2)
    expected = __import__("hashlib").sha256(b"Linear")
    for name, tensor in model.state_dict().items():
        expected.update(name.encode() + str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        expected.update(tensor.numpy().tobytes())
    assert model_fingerprint(model) == expected.hexdigest()[:24]


@pytest.mark.parametrize("make", [gaussian_inputs, lambda example, n: distilled_inputs(make_tiny_net(), example, n)])
def test_synthetic_inputs_accept_one_tensor_alone_or_in_a_one_tuple(make, tiny_input):
    assert make((tiny_input,), 2).shape == (2, 3, 16, 16)
    assert make([tiny_input], 2).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("kind", ["gaussian", "distilled"])
def test_synthetic_inputs_reject_models_called_with_several_inputs(kind, tiny_net, tiny_input):
    for example in [(tiny_input, tiny_input), {"x": tiny_input}, [tiny_input, 2.0], ()]:
        with pytest.raises(ValueError, match="a model called with one input tensor; got"):
            synthetic_inputs(tiny_net, example, kind=kind, cache_dir=False, progress=False)


def test_batchnorm_layers_the_forward_never_reaches_fall_back_to_gaussian(tmp_path):
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)  # defined, never called

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean(dim=(2, 3))

    example = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="reaches none of its BatchNorm"):
        inputs = distilled_inputs(Unused(), example, 3, cache_dir=tmp_path, progress=False)
    assert torch.equal(inputs, gaussian_inputs(example, 3))
    assert not list(tmp_path.rglob("*.npy"))  # the fallback is not cached as distilled inputs
