"""Torch-free graph builders shared by the solver tests.

- :class:`GraphBuilder`: append ops one at a time, get a valid :class:`Graph`.
- :func:`chain_graph`: a forward chain with a mirrored backward (hand-checkable).
- :func:`mlp_chain_graph`: linear+relu layers with parameter gradients.
- :func:`random_training_graph`: seeded random forward DAGs (skips, views,
  multi-output and non-recomputable ops, workspaces, weight copies needed only
  by the backward) with a mirrored backward and gradient accumulation.

Example:
    >>> g = mlp_chain_graph(2)
    >>> g.num_ops, len(g.required_at_end)
    (11, 2)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from solvers import Graph, Op, Value


@dataclass(slots=True)
class GraphBuilder:
    """Mutable helper that appends ops and their output values in order.

    Example:
        >>> b = GraphBuilder()
        >>> x = b.resident("x")
        >>> (h,) = b.add("relu", [x], [64])
        >>> b.build(forward_outputs=[h]).num_ops
        1
    """

    ops: list[Op] = field(default_factory=list)
    values: list[Value] = field(default_factory=list)

    def resident(self, name: str) -> int:
        """Add a resident value (parameter, input); return its index."""
        self.values.append(Value(name, 0, None))
        return len(self.values) - 1

    def add(
        self,
        name: str,
        inputs: Sequence[int],
        out_bytes: Sequence[int],
        *,
        view_of: Sequence[int | None] | None = None,
        time_ms: float = 1.0,
        workspace_bytes: int = 0,
        is_backward: bool = False,
        recomputable: bool = True,
        is_input: bool = False,
    ) -> tuple[int, ...]:
        """Append an op producing one value per ``out_bytes`` entry; return their indices.

        ``view_of[k]`` makes output ``k`` a view of that input value (its bytes
        are then ignored by the memory model).
        """
        op_index = len(self.ops)
        views = list(view_of) if view_of is not None else [None] * len(out_bytes)
        outputs = []
        for k, (n_bytes, base) in enumerate(zip(out_bytes, views)):
            suffix = f".{k}" if len(out_bytes) > 1 else ""
            self.values.append(Value(f"{name}{suffix}", n_bytes, op_index, base))
            outputs.append(len(self.values) - 1)
        self.ops.append(
            Op(name, tuple(inputs), tuple(outputs), time_ms, workspace_bytes,
               is_backward, recomputable, is_input)
        )
        return tuple(outputs)

    def build(self, forward_outputs: Sequence[int] = (), required_at_end: Sequence[int] = ()) -> Graph:
        return Graph(tuple(self.ops), tuple(self.values), tuple(forward_outputs), tuple(required_at_end))


def chain_graph(bytes_per_value: Sequence[int], *, time_ms: float = 1.0) -> Graph:
    """``x -> f1 -> ... -> fn`` (output ``fn`` is the forward output) and its backward.

    Forward op ``k`` makes a value of ``bytes_per_value[k]`` bytes; backward op
    ``k`` reads the incoming gradient and forward op ``k``'s input (so every
    intermediate is saved by the no-remat schedule) and makes a gradient of the
    same size as that input. The last gradient (of ``x``'s consumer's input,
    the first activation) is required at the end; ``x`` gets no gradient.
    """
    b = GraphBuilder()
    x = b.resident("x")
    acts = [x]
    for k, n_bytes in enumerate(bytes_per_value):
        acts += b.add(f"f{k}", [acts[-1]], [n_bytes], time_ms=time_ms)
    (grad,) = b.add("d_out", [], [bytes_per_value[-1]], is_backward=True, recomputable=False,
                    is_input=True, time_ms=0.0)
    for k in range(len(bytes_per_value) - 1, 0, -1):
        (grad,) = b.add(f"f{k}_bwd", [grad, acts[k]], [bytes_per_value[k - 1]],
                        is_backward=True, time_ms=time_ms)
    return b.build(forward_outputs=[acts[-1]], required_at_end=[grad])


def mlp_chain_graph(
    n_layers: int, *, activation_bytes: int = 1000, grad_weight_bytes: int = 100,
    linear_ms: float = 2.0, relu_ms: float = 1.0,
) -> Graph:
    """``n_layers`` of ``relu(linear(h, W_i))``, a scalar loss, and the backward.

    ``linear_bwd`` reads the layer input and ``relu_bwd`` the relu output, as in
    autograd, so no-remat saves both activations of every layer. The weight
    gradients are required at the end.
    """
    b = GraphBuilder()
    h = b.resident("x")
    weights = [b.resident(f"W{i}") for i in range(n_layers)]
    layer_inputs, relu_outputs = [], []
    for i, w in enumerate(weights):
        layer_inputs.append(h)
        (a,) = b.add(f"linear{i}", [h, w], [activation_bytes], time_ms=linear_ms)
        (h,) = b.add(f"relu{i}", [a], [activation_bytes], time_ms=relu_ms)
        relu_outputs.append(h)
    (loss,) = b.add("loss", [h], [8], time_ms=relu_ms)
    (grad,) = b.add("d_loss", [], [8], is_backward=True, recomputable=False, is_input=True, time_ms=0.0)
    (grad,) = b.add("loss_bwd", [grad, h], [activation_bytes], is_backward=True, time_ms=relu_ms)
    grad_weights = []
    for i in reversed(range(n_layers)):
        (grad,) = b.add(f"relu{i}_bwd", [grad, relu_outputs[i]], [activation_bytes],
                        is_backward=True, time_ms=relu_ms)
        grad, grad_w = b.add(f"linear{i}_bwd", [grad, layer_inputs[i], weights[i]],
                             [activation_bytes, grad_weight_bytes], is_backward=True, time_ms=linear_ms)
        grad_weights.append(grad_w)
    return b.build(forward_outputs=[loss], required_at_end=grad_weights)


def random_training_graph(
    rng: random.Random,
    n_forward_ops: int,
    *,
    n_params: int = 4,
    max_bytes: int = 1000,
    view_prob: float = 0.15,
    skip_prob: float = 0.25,
    multi_output_prob: float = 0.1,
    non_recomputable_prob: float = 0.05,
    workspace_prob: float = 0.1,
    weight_copy_prob: float = 0.1,
    extra_forward_outputs: int = 0,
    kept_forward_values: int = 0,
) -> Graph:
    """A seeded random forward DAG (about ``n_forward_ops`` ops) and its mirrored backward.

    The forward is a chain with skip connections to earlier values, views
    (zero-time ops aliasing their input), multi-output ops (some outputs
    unused), non-recomputable ops, workspaces, and weight copies that only the
    backward reads (as AOTAutograd's ``t(W)`` for ``mm``). The last forward op
    makes a small loss, the only forward output. The backward has one input op
    (the loss gradient); each forward op on the loss path gets a backward op
    reading the incoming gradients plus some of the forward op's inputs and
    outputs; gradients of values read several times are summed by ``acc`` ops.
    Parameter gradients are required at the end. ``extra_forward_outputs``
    random activations are forward outputs too (returned hidden states), and
    ``kept_forward_values`` random activations are required at the end (outputs
    the caller keeps).
    """
    b = GraphBuilder()
    x = b.resident("x")
    params = [b.resident(f"p{i}") for i in range(n_params)]
    activations = [x]  # values a forward op may read (x and every forward output)
    weight_copies: dict[int, int] = {}  # forward op -> weight copy its backward reads
    h = x
    for i in range(max(n_forward_ops - 1, 1)):
        if rng.random() < view_prob and h != x:
            (h,) = b.add(f"view{i}", [h], [0], view_of=[h], time_ms=0.0)
            activations.append(h)
            continue
        inputs = [h]
        if rng.random() < skip_prob and len(activations) > 2:
            inputs.append(rng.choice(activations[1:-1]))
        if params and rng.random() < 0.5:
            param = rng.choice(params)
            inputs.append(param)
            if rng.random() < weight_copy_prob:
                (weight_copies[len(b.ops) + 1],) = b.add(f"t{i}", [param], [rng.randint(1, max_bytes)],
                                                         time_ms=0.1)
        n_out = 2 if rng.random() < multi_output_prob else 1
        outputs = b.add(
            f"op{i}", inputs, [rng.randint(1, max_bytes) for _ in range(n_out)],
            time_ms=round(rng.uniform(0.1, 3.0), 3),
            workspace_bytes=rng.randint(1, max_bytes) if rng.random() < workspace_prob else 0,
            recomputable=rng.random() >= non_recomputable_prob,
        )
        h = outputs[0]
        activations.extend(outputs)
    (loss,) = b.add("loss", [h], [8], time_ms=0.1)
    grads = _add_mirrored_backward(b, rng, loss, weight_copies, n_forward=len(b.ops))
    required = [grads[p] for p in params if p in grads]
    produced = activations[1:]
    returned = [loss, *rng.sample(produced, min(extra_forward_outputs, len(produced)))]
    required += rng.sample(produced, min(kept_forward_values, len(produced)))
    return b.build(forward_outputs=sorted(set(returned)), required_at_end=sorted(set(required)))


def _add_mirrored_backward(
    b: GraphBuilder, rng: random.Random, loss: int, weight_copies: dict[int, int], n_forward: int
) -> dict[int, int]:
    """Append the backward of the first ``n_forward`` ops of ``b``; return value -> its gradient."""
    values = b.values
    (d_loss,) = b.add("d_loss", [], [8], is_backward=True, recomputable=False, is_input=True, time_ms=0.0)
    grads: dict[int, int] = {loss: d_loss}
    for i in reversed(range(n_forward)):
        op = b.ops[i]
        incoming = [grads[v] for v in op.outputs if v in grads]
        if not incoming:
            continue  # nothing of this op reaches the loss (weight copies, unused outputs)
        needs_grad = [v for v in dict.fromkeys(op.inputs) if values[v].name != "x"]
        if not needs_grad:
            continue
        saved = [v for v in op.inputs if values[v].producer is not None and rng.random() < 0.7]
        saved += [v for v in op.outputs if rng.random() < 0.5]
        if i in weight_copies:
            saved.append(weight_copies[i])
        is_view = values[op.outputs[0]].view_of is not None
        if is_view:
            # The gradient of a view is a view of the incoming gradient.
            outs = b.add(f"{op.name}_bwd", incoming, [0], view_of=[incoming[0]], time_ms=0.0,
                         is_backward=True)
        else:
            out_bytes = [max(values[v].bytes, 8) for v in needs_grad]
            outs = b.add(f"{op.name}_bwd", incoming + list(dict.fromkeys(saved)), out_bytes,
                         time_ms=round(rng.uniform(0.1, 3.0), 3), is_backward=True,
                         workspace_bytes=op.workspace_bytes)
        for v, g in zip(needs_grad, outs):
            if v in grads:
                (g,) = b.add(f"acc{len(b.ops)}_{values[v].name}", [grads[v], g], [max(values[v].bytes, 8)],
                             time_ms=0.05, is_backward=True)
            grads[v] = g
    return grads
