"""One forward pass over the whole calibration set, node by node, that approximates layers as it reaches them.

The model is traced with ``torch.fx`` and its graph is executed node by node for every calibration batch:
each node's outputs for all batches are computed before the next node runs. When a target layer is reached,
its inputs (from the network approximated so far) are handed to a callback that returns the replacement;
the replacement then produces the outputs that flow on. Every node runs once per batch: the cost grows
linearly with depth (no re-run from the input for each layer). Values whose last user has run are freed;
values that do not fit in ``memory_budget`` bytes spill to temporary files.

With ``with_reference=True`` the original network runs in lockstep on the same graph (a frozen copy of its
modules): the callback then also receives the layer's inputs in the ORIGINAL network, so targets
y = W x + b can be taken at any output position, not only at the positions stored during calibration.
"""

from __future__ import annotations

import copy
import logging
import operator
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

__all__ = ["trace", "LayerwisePass", "activation_after", "NotTraceableError"]

log = logging.getLogger(__name__)

_RELU_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.relu_}
_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout)


class NotTraceableError(RuntimeError):
    """torch.fx could not trace the model (data-dependent control flow)."""


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (Conv2d / Linear stay leaf calls addressed by their qualified names)."""
    try:
        return fx.symbolic_trace(model)
    except Exception as error:  # fx raises many kinds of errors on dynamic models
        raise NotTraceableError(f"{type(model).__name__} is not traceable by torch.fx: {error}") from error


def _is_relu(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_pass_through(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(graph_module.get_submodule(node.target), _PASS_THROUGH_MODULES)


def activation_after(graph_module: fx.GraphModule, name: str) -> str:
    """The nonlinearity that really follows layer ``name``: ``"relu"`` when its output (through Identity or
    Dropout modules, e.g. a folded BatchNorm) feeds only a ReLU, else ``"identity"``.

    A ResNet conv whose output is added to a shortcut before the ReLU gets ``"identity"``: the ReLU acts on
    the sum, so the only target that does not depend on the other branch is the linear response itself.
    """
    nodes = [n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == name]
    if len(nodes) != 1:
        return "identity"
    node = nodes[0]
    while True:
        users = list(node.users)
        if len(users) != 1:
            return "identity"
        user = users[0]
        if _is_pass_through(graph_module, user):
            node = user
            continue
        return "relu" if _is_relu(graph_module, user) else "identity"


class _Values:
    """The per-batch values of one node, held in memory or spilled to files."""

    def __init__(self, values: list, spill_dir: Path | None, key: str) -> None:
        self._paths: list[Path] | None = None
        self._values: list | None = values
        if spill_dir is not None and all(torch.is_tensor(v) for v in values):
            self._paths = []
            for index, value in enumerate(values):
                path = spill_dir / f"{key}_{index}.pt"
                torch.save(value.cpu(), path)
                self._paths.append(path)
            self._values = None

    def __getitem__(self, index: int):
        if self._values is not None:
            return self._values[index]
        return torch.load(self._paths[index], weights_only=True)

    def __len__(self) -> int:
        return len(self._values) if self._values is not None else len(self._paths)

    def free(self) -> None:
        for path in self._paths or []:
            path.unlink(missing_ok=True)
        self._values = None
        self._paths = None


def _nbytes(values: list) -> int:
    return sum(v.numel() * v.element_size() for v in values if torch.is_tensor(v))


class LayerwisePass:
    """Execute a traced model over all batches node by node, replacing target layers on the way.

    Parameters
    ----------
    graph_module : from :func:`trace`; target layers are ``call_module`` nodes named by qualified name.
    batches : the model inputs, one entry per batch (single-input models).
    memory_budget : bytes of live activations kept in memory before new ones spill to disk.
    with_reference : also carry the original network's values (a frozen copy of ``graph_module`` taken
        before any replacement) and pass a target layer's original inputs to the callback.
    """

    def __init__(self, graph_module: fx.GraphModule, batches: Sequence, *, memory_budget: int = 4 << 30,
                 device="cpu", progress: bool = True, with_reference: bool = False) -> None:
        self.graph_module = graph_module
        self.batches = list(batches)
        self.memory_budget = memory_budget
        self.device = torch.device(device)
        self.progress = progress
        self.with_reference = with_reference

    @torch.no_grad()
    def run(self, targets: Sequence[str], on_layer: Callable[[str, nn.Module, Sequence[torch.Tensor]], nn.Module | None]) -> list:
        """Run the pass; ``on_layer(name, module, inputs)`` returns the replacement (or None to keep the layer),
        where ``inputs[i]`` is the layer's input tensor for batch i (loaded lazily when spilled). With
        ``with_reference``, ``on_layer(name, module, inputs, reference_inputs)`` also gets the layer's inputs
        in the original network. Returns the outputs of the approximated network per batch."""
        gm = self.graph_module
        for module in gm.modules():  # values are kept for later nodes: in-place ops would overwrite them
            if getattr(module, "inplace", False):
                module.inplace = False
        reference = copy.deepcopy(gm) if self.with_reference else None
        nodes = list(gm.graph.nodes)
        last_use: dict[fx.Node, int] = {}
        for index, node in enumerate(nodes):
            for arg in node.all_input_nodes:
                last_use[arg] = index
        targets = set(targets)
        env: dict[fx.Node, _Values] = {}
        ref_env: dict[fx.Node, _Values] = {}
        live_bytes = 0
        sizes: dict[tuple[str, fx.Node], int] = {}
        outputs = None
        placeholders = [n for n in nodes if n.op == "placeholder"]
        with tempfile.TemporaryDirectory(prefix="lowrank_fm_pass_") as tmp:
            spill_dir = Path(tmp)

            def store(key: str, table: dict, node: fx.Node, index: int, values: list) -> None:
                nonlocal live_bytes
                size = _nbytes(values)
                spill = spill_dir if live_bytes + size > self.memory_budget else None
                table[node] = _Values(values, spill, f"{key}{index}")
                sizes[(key, node)] = 0 if spill else size
                live_bytes += sizes[(key, node)]

            def free_inputs(key: str, table: dict, node: fx.Node, index: int) -> None:
                nonlocal live_bytes
                for arg in node.all_input_nodes:
                    if last_use.get(arg) == index and arg in table:
                        table.pop(arg).free()
                        live_bytes -= sizes.pop((key, arg), 0)

            bar = tqdm(nodes, desc="layer-wise pass", disable=not self.progress, leave=False)
            for index, node in enumerate(bar):
                if node.op == "output":
                    outputs = [fx.node.map_arg(node.args[0], lambda n, i=i: env[n][i]) for i in range(len(self.batches))]
                    continue
                if node.op == "call_module" and node.target in targets:
                    module = gm.get_submodule(node.target)
                    extra = (ref_env[node.args[0]],) if reference is not None else ()
                    replacement = on_layer(node.target, module, env[node.args[0]], *extra)
                    if replacement is not None:
                        _set_submodule(gm, node.target, replacement)
                store("n", env, node, index, self._evaluate(gm, node, env, placeholders))
                if reference is not None:
                    store("r", ref_env, node, index, self._evaluate(reference, node, ref_env, placeholders))
                free_inputs("n", env, node, index)
                if reference is not None:
                    free_inputs("r", ref_env, node, index)
        return outputs

    def _evaluate(self, gm: fx.GraphModule, node: fx.Node, env: dict, placeholders: list) -> list:
        """The values of ``node`` for every batch, with ``gm``'s modules and attributes."""
        if node.op == "placeholder":
            if node is not placeholders[0]:
                default = node.args[0] if node.args else None
                return [default] * len(self.batches)
            return list(self.batches)
        if node.op == "get_attr":
            return [operator.attrgetter(node.target)(gm)] * len(self.batches)
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        values = []
        for i in range(len(self.batches)):
            args = fx.node.map_arg(node.args, lambda n, i=i: env[n][i])
            kwargs = fx.node.map_arg(node.kwargs, lambda n, i=i: env[n][i])
            if node.op == "call_module":
                values.append(module(*args, **kwargs))
            elif node.op == "call_function":
                values.append(node.target(*args, **kwargs))
            else:  # call_method
                self_obj, *rest = args
                values.append(getattr(self_obj, node.target)(*rest, **kwargs))
        return values


def _set_submodule(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, child, module)
