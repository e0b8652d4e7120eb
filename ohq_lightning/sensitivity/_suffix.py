"""Re-run only the part of a model a perturbed layer changes (internal to :mod:`ohq_lightning.sensitivity`).

MQE perturbs one layer at a time and runs the model again; everything upstream of that layer computes
exactly what the float reference run computed. A :class:`SuffixRunner` traces the model once with
:mod:`torch.fx`, records the values of the reference run, and for a perturbed layer re-executes only the
graph nodes that depend on it, reading every other value from the record. It stays exact because:

* ``call_module`` and ``get_attr`` targets are looked up on the original model at every call, so a layer
  swapped in by ``apply_plan``, a weight edited in place and module hooks (pruning, input quantizers) act
  as in a full forward;
* in-place ops (``ReLU(inplace=True)``) are found by tensor version counters in a probe run: a recorded
  value that a later op overwrites is recorded as a copy taken just before, a re-executed in-place op gets
  copies of the recorded values it reads, and a graph that reads a value after an in-place op changed it
  is refused;
* the traced graph's output must match the model's own.

Only values some layer's re-execution reads are kept (each layer's input, skip and branch inputs), at most
:func:`memory_cap` bytes. Whatever cannot be handled raises :class:`Unsupported`: the caller runs full forwards.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import Node, map_aggregate, map_arg

from ohq_lightning.layers import first_tensor

__all__ = ["MEMORY_CAP_BYTES", "MEMORY_CAP_FRACTION", "SuffixRunner", "Unsupported", "memory_cap", "suffix_runner"]

#: At most this many bytes of recorded values ...
MEMORY_CAP_BYTES: int = 4 * 2**30
#: ... and at most this fraction of the memory free on the inputs' device (RAM for CPU inputs).
MEMORY_CAP_FRACTION: float = 0.25


class Unsupported(Exception):
    """Why a suffix runner cannot stand in for full forwards of this model (the caller runs those instead)."""


class _Tracer(fx.Tracer):
    """The standard tracer, keeping the scored layers whole (e.g. an ``nn.Linear`` subclass from outside
    ``torch.nn``, which it would trace through), so each has a ``call_module`` node to start from."""

    def __init__(self, leaves: frozenset[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module, leaves: Sequence[str]) -> tuple[list[Node], dict[str, Any]]:
    """The model's graph nodes, and the constants the tracer attached to the model (taken off it again)."""
    before = set(vars(model))
    try:
        graph = _Tracer(frozenset(leaves)).trace(model)
    except Exception as error:  # data-dependent control flow, untraceable ops, ...
        raise Unsupported(f"tracing failed: {type(error).__name__}: {str(error)[:200]}") from error
    finally:
        constants = {key: vars(model).pop(key) for key in set(vars(model)) - before}
    return list(graph.nodes), constants


def _resolve(model: nn.Module, constants: dict[str, Any], target: str) -> Any:
    if target in constants:
        return constants[target]
    owner, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


_Op = Callable[[nn.Module, dict[str, Any], Any, tuple, dict], Any]
_OPS: dict[str, _Op] = {
    "call_module": lambda model, _, target, args, kwargs: model.get_submodule(target)(*args, **kwargs),
    "call_function": lambda _m, _c, target, args, kwargs: target(*args, **kwargs),
    "call_method": lambda _m, _c, target, args, kwargs: getattr(args[0], target)(*args[1:], **kwargs),
    "get_attr": lambda model, constants, target, _a, _k: _resolve(model, constants, target),
    "output": lambda _m, _c, _t, args, _k: args[0],
}


def _tensors(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_aggregate(value, lambda item: found.append(item) if isinstance(item, torch.Tensor) else None)
    return found


def _copy(value: Any) -> Any:
    return map_aggregate(value, lambda item: item.clone() if isinstance(item, torch.Tensor) else item)


def _versions(value: Any) -> tuple[int, ...]:
    return tuple(tensor._version for tensor in _tensors(value))


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what can be allocated without swapping; elsewhere the free pages, or a quarter of the cap
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return MEMORY_CAP_BYTES


def memory_cap(device: torch.device) -> int:
    """Most bytes the recorded values may take: :data:`MEMORY_CAP_FRACTION` of the memory free on ``device``,
    at most :data:`MEMORY_CAP_BYTES` -- scoring must never push the machine into swap or out of memory."""
    return int(min(MEMORY_CAP_FRACTION * _available_memory(device), MEMORY_CAP_BYTES))


class SuffixRunner:
    """A model's traced graph with the reference run's values, re-running what one perturbed layer changes."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        """Trace ``model`` and plan, for each layer of ``names``, the nodes to re-run and the values to keep."""
        self.model = model
        self.nodes, self.constants = _trace(model, names)
        placeholders = [node for node in self.nodes if node.op == "placeholder"]
        if not placeholders or str(placeholders[0].target).startswith("*"):
            raise Unsupported("the traced forward takes no single input tensor")
        if any(not node.args for node in placeholders[1:]):
            raise Unsupported("the traced forward takes more than one input without a default")
        self.input, self.output = placeholders[0], self.nodes[-1]
        self.dirty: dict[str, list[Node]] = {}
        self.keep: set[Node] = {self.output}
        for name in names:
            seeds, dirty = self._seeds(name), set()
            for node in self.nodes:  # graph order: every input is decided before its users
                if node in seeds or any(arg in dirty for arg in node.all_input_nodes):
                    dirty.add(node)
            order = self.dirty[name] = [node for node in self.nodes if node in dirty]
            self.keep.update(arg for node in order for arg in node.all_input_nodes if arg not in dirty)
        last_user = {arg: node for node in self.nodes for arg in node.all_input_nodes}
        self.frees: dict[Node, list[Node]] = {}
        for node in self.nodes[:-1]:
            self.frees.setdefault(last_user.get(node, node), []).append(node)
        self.overwrites: dict[Node, list[Node]] = {}
        self.envs: list[dict[Node, Any]] = []
        self.chunks: list[torch.Tensor] = []
        self.nbytes = 0

    def _seeds(self, name: str) -> set[Node]:
        """The nodes perturbing ``name`` changes first: its calls (or a leaf ancestor's) and reads of its tensors."""
        module = self.model.get_submodule(name)
        owned = {id(tensor) for tensor in itertools.chain(module.parameters(), module.buffers())}
        calls, reads = set(), set()
        for node in self.nodes:
            if node.op == "call_module" and (node.target == name or name.startswith(f"{node.target}.")):
                calls.add(node)
            elif node.op == "get_attr" and (
                str(node.target).startswith(f"{name}.") or id(self._run(node, (), {}, None)) in owned
            ):
                reads.add(node)
        if not calls:
            raise Unsupported(f"layer {name!r} has no call_module node in the traced graph")
        return calls | reads

    def _run(self, node: Node, args: Any, kwargs: Any, chunk: torch.Tensor | None) -> Any:
        if node.op == "placeholder":
            return chunk if node is self.input else node.args[0]
        return _OPS[node.op](self.model, self.constants, node.target, args, kwargs)

    def _step(self, node: Node, env: dict[Node, Any], chunk: torch.Tensor, local: dict[Node, Any] | None) -> Any:
        """Run ``node`` reading ``local`` (the re-run values) before ``env``; re-run in-place ops get copies."""
        copy = local is not None and node in self.overwrites

        def value(arg: Node) -> Any:
            if local is not None and arg in local:
                return local[arg]
            return _copy(env[arg]) if copy else env[arg]

        args, kwargs = map_arg(node.args, value), map_arg(node.kwargs, value)
        if local is None:  # recording: keep what this in-place op overwrites as it is now
            for kept in self.overwrites.get(node, ()):
                env[kept] = _copy(env[kept])
        return self._run(node, args, kwargs, chunk)

    def _probe(self, chunk: torch.Tensor) -> int:
        """Run the graph watching version counters (which node overwrites which kept value); the bytes kept."""
        env: dict[Node, Any] = {}
        watched: dict[Node, tuple[int, ...]] = {}
        overwritten: set[Node] = set()
        for node in self.nodes:
            stale = [arg.name for arg in node.all_input_nodes if arg in overwritten]
            if stale:
                raise Unsupported(f"node {node.name} reads {stale[0]} after an in-place op changed it")
            env[node] = self._step(node, env, chunk, None)
            if node in self.keep:
                watched[node] = _versions(env[node])
            for kept, versions in list(watched.items()):
                if _versions(env[kept]) != versions:
                    self.overwrites.setdefault(node, []).append(kept)
                    overwritten.add(kept)
                    del watched[kept]
            self._free(env, node)
        held = [node for node in self.keep if node.op not in ("placeholder", "get_attr")]
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for n in held for t in _tensors(env[n])
        }
        return sum(storages.values()) + sum(t.nbytes for n in overwritten for t in _tensors(env[n]))

    def _free(self, env: dict[Node, Any], node: Node) -> None:
        """Drop the values whose last reader is ``node``, but those a re-run reads."""
        for done in self.frees.get(node, ()):
            if done not in self.keep:
                del env[done]

    def _record(self, chunk: torch.Tensor) -> dict[Node, Any]:
        env: dict[Node, Any] = {}
        for node in self.nodes:
            env[node] = self._step(node, env, chunk, None)
            self._free(env, node)
        return env

    def record(self, chunks: Sequence[torch.Tensor], reference: torch.Tensor) -> None:
        """Record the reference run on ``chunks``, checked against the model's own ``reference`` output."""
        per_input = self._probe(chunks[0]) / max(len(chunks[0]), 1)
        self.nbytes = int(per_input * sum(len(chunk) for chunk in chunks))
        cap = memory_cap(chunks[0].device)
        if self.nbytes > cap:
            raise Unsupported(f"recorded values would take {self.nbytes / 2**20:.0f} MiB, over {cap / 2**20:.0f}")
        self.chunks, self.envs = list(chunks), [self._record(chunk) for chunk in chunks]
        outputs = [first_tensor(env[self.output]) for env in self.envs]
        if any(output is None for output in outputs):
            raise Unsupported("the traced graph's output holds no tensor")
        output = torch.cat([output.detach() for output in outputs if output is not None])
        if output.shape != reference.shape or not torch.allclose(output, reference, rtol=1e-5, atol=1e-6):
            raise Unsupported("the traced graph's output differs from the model's")

    def logits(self, name: str) -> torch.Tensor:
        """The model's output (first tensor, all chunks) as it is now, re-running only what ``name`` changes."""
        outputs = []
        for chunk, env in zip(self.chunks, self.envs, strict=True):
            local: dict[Node, Any] = {}
            for node in self.dirty[name]:
                local[node] = self._step(node, env, chunk, local)
                for done in self.frees.get(node, ()):
                    local.pop(done, None)
            output = first_tensor(local.get(self.output, env[self.output]))
            if output is None:
                raise ValueError("the model's output holds no tensor to compare")
            outputs.append(output.detach())
        return torch.cat(outputs)

    def close(self) -> None:
        """Free the recorded values."""
        self.envs, self.chunks = [], []


def suffix_runner(
    model: nn.Module, names: Sequence[str], chunks: Sequence[torch.Tensor], reference: torch.Tensor
) -> tuple[SuffixRunner | None, str]:
    """A recorded :class:`SuffixRunner` and ``"suffix"``, or None and ``"full: <why not>"``."""
    try:
        runner = SuffixRunner(model, names)
        runner.record(chunks, reference)
    except Unsupported as why:
        return None, f"full: {why}"
    except Exception as error:  # e.g. an op the traced graph cannot run as traced: full forwards will do
        return None, f"full: the traced graph failed: {type(error).__name__}: {str(error)[:200]}"
    return runner, "suffix"
