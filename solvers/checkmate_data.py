"""Checkmate's published training graphs as :class:`Graph` objects.

The files (``checkmate/{vgg16,mobilenet,resnet50}_train.json`` in the shared
data folder, see its README) are networkx node-link JSON: each node is a layer
of a Keras training step, ``{"id", "name", "backward", "cost_cpu",
"cost_ram"}``, and a link ``source -> target`` means the target reads the
source's output. Ids are a topological order with the forward nodes first.

Mapping onto the IR (documented choices):

- every node is one op with one output value of ``cost_ram`` bytes and
  ``time_ms = cost_cpu`` (Checkmate's profiled cost, in its own units; only
  ratios are meaningful);
- forward nodes are recomputable forward ops; backward nodes are backward ops
  (run once, in id order);
- forward nodes with no forward predecessor (the first layer) read one
  resident value, ``input``: the batch, which Checkmate leaves out of the graph
  and of the budget, as the budget here leaves out everything resident;
- the ``Loss`` node (loss and its gradient, reading the predictions) is an
  ordinary backward op, the first of the backward phase; there is no input op;
- forward outputs: the outputs of forward nodes that no forward node reads
  (the predictions), so the forward phase ends with the model output;
- required at the end: the outputs of backward nodes that nothing reads (the
  gradient of the first layer's input). Parameter gradients are not in the data.

The no-remat schedule of the result computes every node once in id order and
frees each output after its last reader, which is the "fixed topological
order" baseline the papers' budget fractions refer to.

Example:
    >>> g = load_checkmate_graph(checkmate_graph_path("vgg16"))   # doctest: +SKIP
    >>> g.num_ops, sum(op.is_backward for op in g.ops)           # doctest: +SKIP
    (45, 23)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .graph import Graph, Op, Value

#: Model name -> file name inside ``<data dir>/checkmate``.
CHECKMATE_FILES = {
    "vgg16": "vgg16_train.json",
    "mobilenet": "mobilenet_train.json",
    "resnet50": "resnet50_train.json",
}

#: Environment variable naming the shared data folder (the one holding ``checkmate/``).
DATA_DIR_ENV = "REMATC_DATA_DIR"


def data_dir() -> Path | None:
    """The shared data folder: ``$REMATC_DATA_DIR``, else ``<repo>/../shared/data``; None if absent."""
    candidates = []
    if os.environ.get(DATA_DIR_ENV):
        candidates.append(Path(os.environ[DATA_DIR_ENV]))
    repo_root = Path(__file__).resolve().parents[1]
    candidates.append(repo_root.parent / "shared" / "data")
    for path in candidates:
        if (path / "checkmate").is_dir():
            return path
    return None


def checkmate_graph_path(model: str) -> Path | None:
    """Path of ``model``'s JSON file ("vgg16", "mobilenet", "resnet50"); None if the data is absent."""
    if model not in CHECKMATE_FILES:
        raise ValueError(f"model must be one of {sorted(CHECKMATE_FILES)}, got {model!r}")
    root = data_dir()
    if root is None:
        return None
    path = root / "checkmate" / CHECKMATE_FILES[model]
    return path if path.is_file() else None


def load_checkmate_graph(path: str | Path) -> Graph:
    """Read one Checkmate node-link JSON file into a :class:`Graph` (mapping in the module docstring).

    Raises:
        ValueError: the file is not a node-link graph of that format, or its
            ids are not a topological order with forward nodes first.
    """
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "nodes" not in data or "links" not in data:
        raise ValueError(f"{path}: expected a node-link JSON object with 'nodes' and 'links'")
    nodes = sorted(data["nodes"], key=lambda n: n["id"])
    position = {node["id"]: i for i, node in enumerate(nodes)}
    readers_of: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    inputs_of: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for link in data["links"]:
        source, target = position[link["source"]], position[link["target"]]
        if source >= target:
            raise ValueError(f"{path}: link {link['source']} -> {link['target']} is not in id order")
        inputs_of[target].append(source)
        readers_of[source].append(target)
    backward = [bool(node["backward"]) for node in nodes]
    first_backward = backward.index(True) if True in backward else len(nodes)
    if any(backward[:first_backward]) or not all(backward[first_backward:]):
        raise ValueError(f"{path}: forward nodes must come before backward nodes in id order")
    # Value 0 is the resident input batch; value i + 1 is node i's output.
    values = [Value("input", 0, None)]
    ops = []
    for i, node in enumerate(nodes):
        reads = tuple(p + 1 for p in sorted(set(inputs_of[i])))
        if not backward[i] and not inputs_of[i]:
            reads = (0,)
        values.append(Value(str(node["name"]), int(node["cost_ram"]), i))
        ops.append(Op(str(node["name"]), reads, (i + 1,), time_ms=float(node["cost_cpu"]),
                      is_backward=backward[i]))
    forward_outputs = tuple(
        i + 1 for i in range(first_backward) if not any(not backward[r] for r in readers_of[i])
    )
    required = tuple(i + 1 for i in range(first_backward, len(nodes)) if not readers_of[i])
    return Graph(tuple(ops), tuple(values), forward_outputs, required)
