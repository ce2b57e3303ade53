"""Synthetic training graphs with realistic sizes (torch-free), for tests and benchmarks.

:func:`transformer_graph` builds a GPT-2-like step: token and position
embeddings, ``n_layers`` identical pre-LayerNorm layers (attention with
dropout on the probabilities, MLP with GELU, residual adds), a final
LayerNorm, an LM head tied to the token embedding and a cross-entropy loss,
with the backward autograd would build (parameter gradients required at the
end, the tied embedding's two gradient halves summed in the first block).
Bytes come from the shapes (float32); times from a roofline model
(``flops / 50 TFLOP/s`` vs ``bytes / 1 TB/s``).

Example:
    >>> g = transformer_graph(2)
    >>> g.num_ops, sum(op.is_backward for op in g.ops) > 40
    (119, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .graph import Graph, Op, Value

_FLOPS_PER_MS = 50e12 / 1e3
_BYTES_PER_MS = 1e12 / 1e3
_F32 = 4


@dataclass(slots=True)
class _Builder:
    ops: list[Op] = field(default_factory=list)
    values: list[Value] = field(default_factory=list)

    def resident(self, name: str) -> int:
        self.values.append(Value(name, 0, None))
        return len(self.values) - 1

    def op(self, name: str, inputs: list[int], out_bytes: list[int], *, flops: float = 0.0,
           views: list[int | None] | None = None, backward: bool = False, is_input: bool = False,
           workspace_bytes: int = 0) -> list[int]:
        index = len(self.ops)
        moved = sum(self.values[v].bytes for v in inputs) + sum(out_bytes)
        time_ms = 0.0 if is_input else max(flops / _FLOPS_PER_MS, moved / _BYTES_PER_MS)
        views = views or [None] * len(out_bytes)
        outs = []
        for k, (n_bytes, base) in enumerate(zip(out_bytes, views)):
            self.values.append(Value(f"{name}.{k}" if len(out_bytes) > 1 else name,
                                     0 if base is not None else n_bytes, index, base))
            outs.append(len(self.values) - 1)
        if base_views := [b for b in views if b is not None]:
            time_ms = 0.0 if len(base_views) == len(views) else time_ms
        self.ops.append(Op(name, tuple(inputs), tuple(outs), time_ms, workspace_bytes, backward,
                           not is_input, is_input))
        return outs


@dataclass(frozen=True, slots=True)
class TransformerShape:
    """GPT-2 small by default."""

    batch: int = 4
    seq: int = 512
    n_embd: int = 768
    n_head: int = 12
    vocab: int = 50257


def transformer_graph(n_layers: int, shape: TransformerShape | None = None, *, lm_head: bool = True) -> Graph:
    """A GPT-2-like training step with ``n_layers`` identical layers (see the module docstring)."""
    s = shape if shape is not None else TransformerShape()
    b = _Builder()
    tokens, wte, wpe = b.resident("tokens"), b.resident("wte"), b.resident("wpe")
    bsd = s.batch * s.seq * s.n_embd * _F32
    grads: list[int] = []
    (tok,) = b.op("tok_emb", [tokens, wte], [bsd])
    (pos,) = b.op("pos_emb", [wpe], [s.seq * s.n_embd * _F32])
    (h,) = b.op("emb_add", [tok, pos], [bsd])
    saved_layers = []
    for i in range(n_layers):
        h, saved = _layer_forward(b, s, h, i)
        saved_layers.append(saved)
    ln_f, mean_f, rstd_f = b.op("ln_f", [h], [bsd, s.batch * s.seq * _F32, s.batch * s.seq * _F32],
                                flops=8 * bsd / _F32)
    out = ln_f
    logits_bytes = s.batch * s.seq * s.vocab * _F32
    if lm_head:
        (wte_t,) = b.op("wte_t", [wte], [0], views=[wte])
        (logits,) = b.op("lm_head", [ln_f, wte_t], [logits_bytes], flops=2 * s.batch * s.seq * s.n_embd * s.vocab)
        (lse,) = b.op("log_softmax", [logits], [logits_bytes], flops=5 * logits_bytes / _F32)
        (loss,) = b.op("nll_loss", [lse, tokens], [_F32], flops=s.batch * s.seq)
        out = loss
    (d_out,) = b.op("d_loss", [], [_F32 if lm_head else bsd], backward=True, is_input=True)
    grad = d_out
    if lm_head:
        (grad,) = b.op("nll_loss_bwd", [grad, tokens], [logits_bytes], backward=True)
        (grad,) = b.op("log_softmax_bwd", [grad, lse], [logits_bytes], backward=True, flops=5 * logits_bytes / _F32)
        (grad_ln,) = b.op("lm_head_bwd_in", [grad, wte_t], [bsd], backward=True,
                          flops=2 * s.batch * s.seq * s.n_embd * s.vocab)
        (d_wte_head,) = b.op("lm_head_bwd_w", [grad, ln_f], [s.vocab * s.n_embd * _F32], backward=True,
                             flops=2 * s.batch * s.seq * s.n_embd * s.vocab)
        grad = grad_ln
    small = s.n_embd * _F32
    grad, dg, db = b.op("ln_f_bwd", [grad, h, mean_f, rstd_f], [bsd, small, small], backward=True,
                        flops=10 * bsd / _F32)
    grads += [dg, db]
    for i in reversed(range(n_layers)):
        grad, layer_grads = _layer_backward(b, s, grad, saved_layers[i], i)
        grads += layer_grads
    (d_pos,) = b.op("pos_emb_bwd", [grad], [s.seq * s.n_embd * _F32], backward=True)
    (d_wte,) = b.op("tok_emb_bwd", [grad, tokens], [s.vocab * s.n_embd * _F32], backward=True)
    if lm_head:
        (d_wte,) = b.op("wte_grad_sum", [d_wte, d_wte_head], [s.vocab * s.n_embd * _F32], backward=True)
    grads += [d_pos, d_wte]
    return Graph(tuple(b.ops), tuple(b.values), (out,), tuple(grads))


def _layer_forward(b: _Builder, s: TransformerShape, x: int, i: int) -> tuple[int, dict[str, int]]:
    bsd = s.batch * s.seq * s.n_embd * _F32
    rows = s.batch * s.seq * _F32
    scores = s.batch * s.n_head * s.seq * s.seq * _F32
    w = {name: b.resident(f"l{i}.{name}") for name in ("ln1", "attn", "proj", "ln2", "fc", "fc2")}
    d = s.n_embd
    ln1, mean1, rstd1 = b.op(f"l{i}.ln1", [x, w["ln1"]], [bsd, rows, rows], flops=8 * bsd / _F32)
    (qkv,) = b.op(f"l{i}.qkv", [ln1, w["attn"]], [3 * bsd], flops=2 * s.batch * s.seq * d * 3 * d)
    q, k, v = b.op(f"l{i}.split", [qkv], [0, 0, 0], views=[qkv, qkv, qkv])
    (sc,) = b.op(f"l{i}.scores", [q, k], [scores], flops=2 * s.batch * s.seq * s.seq * d)
    (masked,) = b.op(f"l{i}.mask_scale", [sc], [scores], flops=2 * scores / _F32)
    (probs,) = b.op(f"l{i}.softmax", [masked], [scores], flops=5 * scores / _F32)
    drop, keep = b.op(f"l{i}.dropout", [probs], [scores, scores // _F32], flops=2 * scores / _F32)
    (ctx,) = b.op(f"l{i}.ctx", [drop, v], [bsd], flops=2 * s.batch * s.seq * s.seq * d)
    (ctx2,) = b.op(f"l{i}.merge_heads", [ctx], [bsd])
    (proj,) = b.op(f"l{i}.proj", [ctx2, w["proj"]], [bsd], flops=2 * s.batch * s.seq * d * d)
    (h,) = b.op(f"l{i}.res1", [x, proj], [bsd])
    ln2, mean2, rstd2 = b.op(f"l{i}.ln2", [h, w["ln2"]], [bsd, rows, rows], flops=8 * bsd / _F32)
    (fc,) = b.op(f"l{i}.fc", [ln2, w["fc"]], [4 * bsd], flops=2 * s.batch * s.seq * d * 4 * d)
    (act,) = b.op(f"l{i}.gelu", [fc], [4 * bsd], flops=8 * 4 * bsd / _F32)
    (fc2,) = b.op(f"l{i}.fc2", [act, w["fc2"]], [bsd], flops=2 * s.batch * s.seq * 4 * d * d)
    (out,) = b.op(f"l{i}.res2", [h, fc2], [bsd])
    saved = dict(x=x, ln1=ln1, mean1=mean1, rstd1=rstd1, q=q, k=k, v=v, probs=probs, drop=drop, keep=keep,
                 ctx2=ctx2, h=h, ln2=ln2, mean2=mean2, rstd2=rstd2, fc=fc, act=act, **{f"w_{n}": r for n, r in w.items()})
    return out, saved


def _layer_backward(b: _Builder, s: TransformerShape, grad: int, sv: dict[str, int], i: int) -> tuple[int, list[int]]:
    bsd = s.batch * s.seq * s.n_embd * _F32
    scores = s.batch * s.n_head * s.seq * s.seq * _F32
    d = s.n_embd
    mm = 2 * s.batch * s.seq * d * d
    small = d * _F32

    def bw(name: str, inputs: list[int], out_bytes: list[int], flops: float = 0.0) -> list[int]:
        return b.op(f"l{i}.{name}", inputs, out_bytes, flops=flops, backward=True)

    (d_act,) = bw("fc2_bwd_in", [grad, sv["w_fc2"]], [4 * bsd], 4 * mm)
    (dw_fc2,) = bw("fc2_bwd_w", [grad, sv["act"]], [4 * d * d * _F32], 4 * mm)
    (d_fc,) = bw("gelu_bwd", [d_act, sv["fc"]], [4 * bsd], 8 * 4 * bsd / _F32)
    (d_ln2,) = bw("fc_bwd_in", [d_fc, sv["w_fc"]], [bsd], 4 * mm)
    (dw_fc,) = bw("fc_bwd_w", [d_fc, sv["ln2"]], [4 * d * d * _F32], 4 * mm)
    d_h2, dg2, db2 = bw("ln2_bwd", [d_ln2, sv["h"], sv["mean2"], sv["rstd2"], sv["w_ln2"]], [bsd, small, small],
                        10 * bsd / _F32)
    (d_h,) = bw("res2_bwd", [grad, d_h2], [bsd])
    (d_ctx2,) = bw("proj_bwd_in", [d_h, sv["w_proj"]], [bsd], mm)
    (dw_proj,) = bw("proj_bwd_w", [d_h, sv["ctx2"]], [d * d * _F32], mm)
    (d_ctx,) = bw("merge_heads_bwd", [d_ctx2], [bsd])
    (d_drop,) = bw("ctx_bwd_probs", [d_ctx, sv["v"]], [scores], 2 * s.batch * s.seq * s.seq * d)
    (d_v,) = bw("ctx_bwd_v", [d_ctx, sv["drop"]], [bsd], 2 * s.batch * s.seq * s.seq * d)
    (d_probs,) = bw("dropout_bwd", [d_drop, sv["keep"]], [scores], 2 * scores / _F32)
    (d_masked,) = bw("softmax_bwd", [d_probs, sv["probs"]], [scores], 5 * scores / _F32)
    (d_sc,) = bw("mask_scale_bwd", [d_masked], [scores], 2 * scores / _F32)
    (d_q,) = bw("scores_bwd_q", [d_sc, sv["k"]], [bsd], 2 * s.batch * s.seq * s.seq * d)
    (d_k,) = bw("scores_bwd_k", [d_sc, sv["q"]], [bsd], 2 * s.batch * s.seq * s.seq * d)
    (d_qkv,) = bw("split_bwd", [d_q, d_k, d_v], [3 * bsd])
    (d_ln1,) = bw("qkv_bwd_in", [d_qkv, sv["w_attn"]], [bsd], 3 * mm)
    (dw_attn,) = bw("qkv_bwd_w", [d_qkv, sv["ln1"]], [3 * d * d * _F32], 3 * mm)
    d_x1, dg1, db1 = bw("ln1_bwd", [d_ln1, sv["x"], sv["mean1"], sv["rstd1"], sv["w_ln1"]], [bsd, small, small],
                        10 * bsd / _F32)
    (d_x,) = bw("res1_bwd", [d_h, d_x1], [bsd])
    return d_x, [dw_fc2, dw_fc, dg2, db2, dw_proj, dw_attn, dg1, db1]
