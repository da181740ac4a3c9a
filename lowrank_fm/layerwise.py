"""One forward pass over the whole calibration set, node by node, that approximates layers as it reaches them.

The model is traced with ``torch.fx`` and its graph is executed for every calibration batch. A target layer
needs its inputs for all batches before it can be fitted, so the graph is cut at the target layers into
segments; each segment runs batch by batch, and only the values a later segment reads (the next target's input,
a shortcut) are kept for every batch. When a target layer is reached, its inputs (from the network approximated
so far) are handed to a callback that returns the replacement; the replacement then produces the outputs that
flow on. Every node runs once per batch: the cost grows linearly with depth (no re-run from the input for each
layer). Kept values that do not fit in ``memory_budget`` bytes spill to temporary files, one per batch, so memory
stays bounded by the budget plus one batch's values whatever the number of images.

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
from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

__all__ = ["trace", "LayerwisePass", "activation_after", "activation_after_sum", "shortcut_partner",
           "NotTraceableError"]

log = logging.getLogger(__name__)

_RELU_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
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
    the sum, so the only target that does not depend on the other branch is the linear response itself
    (with the shortcut compensation, :func:`activation_after_sum` is the one that acts on the sum).
    """
    nodes = [n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == name]
    return "identity" if len(nodes) != 1 else _activation_following(graph_module, nodes[0])


def activation_after_sum(graph_module: fx.GraphModule, name: str) -> str:
    """The nonlinearity that follows the residual sum s = y + v that layer ``name``'s output y feeds
    (``"relu"`` or ``"identity"``; ``"identity"`` when y feeds no such sum)."""
    summed = _residual_sum(graph_module, name)
    return "identity" if summed is None else _activation_following(graph_module, summed[0])


def _activation_following(graph_module: fx.GraphModule, node: fx.Node) -> str:
    """``"relu"`` when ``node``'s value (through pass-through modules) feeds only a ReLU, else ``"identity"``."""
    while True:
        users = list(node.users)
        if len(users) != 1:
            return "identity"
        user = users[0]
        if _is_pass_through(graph_module, user):
            node = user
            continue
        return "relu" if _is_relu(graph_module, user) else "identity"


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and not node.kwargs


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def _residual_sum(graph_module: fx.GraphModule, name: str) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(the sum node, its other operand, the layer's node) when layer ``name``'s output (through pass-through
    modules) feeds only a sum of two nodes, else None."""
    nodes = [n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == name]
    if len(nodes) != 1:
        return None
    layer = node = nodes[0]
    while len(node.users) == 1 and _is_pass_through(graph_module, next(iter(node.users))):
        node = next(iter(node.users))
    users = list(node.users)
    if len(users) != 1 or not _is_add(users[0]) or len(users[0].args) != 2:
        return None
    others = [arg for arg in users[0].args if arg is not node]
    if len(others) != 1 or not isinstance(others[0], fx.Node):
        return None
    return users[0], others[0], layer


def shortcut_partner(graph_module: fx.GraphModule, name: str, targets) -> fx.Node | None:
    """The other operand v of the residual sum s = y + v that layer ``name``'s output y feeds (through
    Identity or Dropout modules, e.g. a folded BatchNorm), or None.

    None also when v depends on the layer itself or on a layer of ``targets`` that comes later in the graph
    (that layer is still to be replaced, so v is not final yet: a torchvision block's ``downsample`` conv, run
    after ``conv2``; the later layer gets the shift instead).
    """
    summed = _residual_sum(graph_module, name)
    if summed is None:
        return None
    _, partner, layer = summed
    order = {n: i for i, n in enumerate(graph_module.graph.nodes)}
    targets = set(targets)
    for ancestor in _ancestors(partner) | {partner}:
        if ancestor is layer or (ancestor.op == "call_module" and ancestor.target in targets
                                 and order[ancestor] > order[layer]):
            return None
    return partner


class _ShortcutShift:
    """Per batch, v - vhat: the residual sum's other operand in the original network minus the same in the
    network approximated so far (computed when read, one batch at a time); with ``approximated``, vhat."""

    def __init__(self, owner: "LayerwisePass", partner: fx.Node, networks: list, placeholders: list,
                 approximated: bool = False) -> None:
        self._owner, self._partner, self._networks, self._placeholders = owner, partner, networks, placeholders
        self._approximated = approximated

    def __len__(self) -> int:
        return len(self._owner.batches)

    def __getitem__(self, index: int) -> torch.Tensor:
        values = []
        # (approximated, original); vhat alone needs only the first. A value kept by an earlier segment is read,
        # any other computed from what was kept
        for network, env in self._networks[:1] if self._approximated else self._networks:
            if self._partner in env:
                values.append(env[self._partner][index])
            else:
                values.append(self._owner._evaluate(network, self._partner, index, env, {}, self._placeholders))
        return values[0] if self._approximated else values[1] - values[0]


class _Spilled(NamedTuple):
    """A value spilled to ``path``, computed on ``device``."""

    path: Path
    device: torch.device


class _Values:
    """The per-batch values of one node: each held in memory or spilled to its own file.

    Values are appended batch by batch (:meth:`append`), so a node whose values do not fit never has more
    than one batch's value in memory: memory is bounded by the budget plus the values of one batch."""

    def __init__(self, spill_dir: Path, key: str) -> None:
        self._spill_dir, self._key = spill_dir, key
        self._entries: list = []  # the value itself, or where it was spilled
        self.bytes_in_memory = 0

    def append(self, value, spill: bool) -> None:
        if spill and torch.is_tensor(value):
            path = self._spill_dir / f"{self._key}_{len(self._entries)}.pt"
            torch.save(value.cpu(), path)
            self._entries.append(_Spilled(path, value.device))  # read back onto the device it was computed on
        else:
            self._entries.append(value)
            self.bytes_in_memory += _nbytes(value)

    def __getitem__(self, index: int):
        entry = self._entries[index]
        if isinstance(entry, _Spilled):
            return torch.load(entry.path, weights_only=True, map_location=entry.device)
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def free(self) -> None:
        for entry in self._entries:
            if isinstance(entry, _Spilled):
                entry.path.unlink(missing_ok=True)
        self._entries = []
        self.bytes_in_memory = 0


_STATIC = ("placeholder", "get_attr")  # values looked up from the batches or the module, never kept


def _nbytes(value) -> int:
    return value.numel() * value.element_size() if torch.is_tensor(value) else 0


def _segments(nodes: list[fx.Node], is_target: Callable[[fx.Node], bool]) -> list[tuple[int, int]]:
    """The node index ranges [start, stop) run batch by batch: each target layer starts a new segment, which
    runs up to the next target layer (or the output node, which is not in any segment)."""
    bounds = [0] + [i for i, n in enumerate(nodes) if i > 0 and is_target(n)]
    stop = next((i for i, n in enumerate(nodes) if n.op == "output"), len(nodes))
    return [(a, b) for a, b in zip(bounds, bounds[1:] + [stop]) if a < b]


class LayerwisePass:
    """Execute a traced model over all batches, replacing target layers on the way.

    The nodes between two target layers form a segment, run batch by batch: only the values that later
    segments read (the next target's input, a shortcut) are kept for every batch, in memory or spilled; the
    values inside a segment live for one batch. A target layer sees its inputs for every batch before its
    replacement runs on any of them.

    Parameters
    ----------
    graph_module : from :func:`trace`; target layers are ``call_module`` nodes named by qualified name.
    batches : the model inputs, one entry per batch (single-input models).
    memory_budget : bytes of kept values held in memory before further ones spill to disk, one file per batch.
    with_reference : also carry the original network's values (a frozen copy of ``graph_module`` taken
        before any replacement) and pass a target layer's original inputs to the callback.
    shortcut_shifts : (with ``with_reference``) also pass ``shortcut_shift=``: for a layer whose output feeds a
        residual sum s = y + v (:func:`shortcut_partner`), per batch v - vhat, the other operand in the original
        network minus the same in the approximated one, shaped as the layer's output, and ``shortcut_value=``,
        per batch vhat; both None for other layers.
        A layer fitted to y + v - vhat from its approximated inputs makes yhat + vhat, the sum the next layers
        see, match the original sum (He, Zhang, Sun, ICCV 2017, "multi-branch enhancement").
    """

    def __init__(self, graph_module: fx.GraphModule, batches: Sequence, *, memory_budget: int = 4 << 30,
                 device="cpu", progress: bool = True, with_reference: bool = False,
                 shortcut_shifts: bool = False) -> None:
        if shortcut_shifts and not with_reference:
            raise ValueError("shortcut_shifts needs with_reference=True (the original network's values)")
        self.graph_module = graph_module
        self.batches = list(batches)
        self.memory_budget = memory_budget
        self.device = torch.device(device)
        self.progress = progress
        self.with_reference = with_reference
        self.shortcut_shifts = shortcut_shifts

    @torch.no_grad()
    def run(self, targets: Sequence[str], on_layer: Callable[[str, nn.Module, Sequence[torch.Tensor]], nn.Module | None]) -> list:
        """Run the pass; ``on_layer(name, module, inputs)`` returns the replacement (or None to keep the layer),
        where ``inputs[i]`` is the layer's input tensor for batch i (loaded lazily when spilled). With
        ``with_reference``, ``on_layer(name, module, inputs, reference_inputs)`` also gets the layer's inputs
        in the original network, and with ``shortcut_shifts`` the keywords ``shortcut_shift`` and
        ``shortcut_value`` (see the class).
        Returns the outputs of the approximated network per batch."""
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
        position = {node: index for index, node in enumerate(nodes)}
        targets = set(targets)

        def is_target(node: fx.Node) -> bool:
            return node.op == "call_module" and node.target in targets

        networks = [(gm, {})] + ([(reference, {})] if reference is not None else [])
        live = 0  # bytes of kept values in memory, over both networks
        placeholders = [n for n in nodes if n.op == "placeholder"]
        output_node = next(n for n in nodes if n.op == "output")
        with tempfile.TemporaryDirectory(prefix="lowrank_fm_pass_") as tmp:
            spill_dir = Path(tmp)
            bar = tqdm(total=len(nodes), desc="layer-wise pass", disable=not self.progress, leave=False)
            for start, stop in _segments(nodes, is_target):
                node = nodes[start]
                if is_target(node):
                    inputs = [self._all_batches(owner, node.args[0], env, placeholders) for owner, env in networks]
                    extra = {}
                    if self.shortcut_shifts:
                        partner = shortcut_partner(gm, node.target, targets)
                        for key, approximated in (("shortcut_shift", False), ("shortcut_value", True)):
                            extra[key] = (None if partner is None else
                                          _ShortcutShift(self, partner, networks, placeholders, approximated))
                    replacement = on_layer(node.target, gm.get_submodule(node.target), *inputs, **extra)
                    if replacement is not None:
                        _set_submodule(gm, node.target, replacement)
                segment = nodes[start:stop]
                # read by a later segment or the output; the model's inputs and attributes are looked up, not kept
                kept = [n for n in segment if n.op not in _STATIC and last_use.get(n, -1) >= stop]
                for key, (_, env) in zip("nr", networks):
                    for n in kept:
                        env[n] = _Values(spill_dir, f"{key}{position[n]}")
                for i in range(len(self.batches)):
                    for module_owner, env in networks:
                        local: dict[fx.Node, object] = {}
                        for n in segment:
                            local[n] = self._evaluate(module_owner, n, i, env, local, placeholders)
                        for n in kept:
                            size = _nbytes(local[n])
                            spill = live + size > self.memory_budget
                            env[n].append(local[n], spill)
                            live += 0 if spill else size
                for _, env in networks:  # values whose last reader ran in this segment
                    for n in [n for n in env if start <= last_use.get(n, -1) < stop]:
                        live -= env[n].bytes_in_memory
                        env.pop(n).free()
                bar.update(len(segment))
            values = {n: self._all_batches(gm, n, networks[0][1], placeholders) for n in output_node.all_input_nodes}
            outputs = [fx.node.map_arg(output_node.args[0], lambda n, i=i: values[n][i]) for i in range(len(self.batches))]
            bar.update(1)
            bar.close()
        return outputs

    def _all_batches(self, gm: fx.GraphModule, node: fx.Node, env: dict, placeholders: list):
        """``node``'s values for every batch: kept (lazily loaded when spilled), or the model's input / an attribute."""
        if node in env:
            return env[node]
        return [self._evaluate(gm, node, i, env, {}, placeholders) for i in range(len(self.batches))]

    def _evaluate(self, gm: fx.GraphModule, node: fx.Node, i: int, env: dict, local: dict, placeholders: list):
        """The value of ``node`` for batch ``i`` with ``gm``'s modules and attributes; its inputs come from
        ``local`` (this segment, this batch) or ``env`` (kept values of earlier segments)."""
        if node.op == "placeholder":
            if node is not placeholders[0]:
                return node.args[0] if node.args else None
            return self.batches[i]
        if node.op == "get_attr":
            return operator.attrgetter(node.target)(gm)

        def value(n: fx.Node):
            if n not in local:  # a kept value of an earlier segment (loaded once per batch), or an input / attribute
                local[n] = env[n][i] if n in env else self._evaluate(gm, n, i, env, local, placeholders)
            return local[n]

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "call_module":
            return gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        self_obj, *rest = args  # call_method
        return getattr(self_obj, node.target)(*rest, **kwargs)


def _set_submodule(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, child, module)
