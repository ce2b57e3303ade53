"""rematc against checkpointing every block, on Hugging Face models called the ordinary way.

Usage::

    python benchmarks/checkpointing.py                         # full sizes, several minutes on a 2-core CPU
    python benchmarks/checkpointing.py --quick                 # the zoo's tiny sizes (smoke runs)
    python benchmarks/checkpointing.py --models hf_gpt2,hf_opt --readme README.md

Models: the Hugging Face entries of the zoo (``hf_gpt2``, ``hf_llama``,
``hf_bert``, ``hf_vit``: the configs of ``tests/zoo_models.py``, dropout
included) plus an OPT LM (``hf_opt``) and a Mistral LM with grouped-query
attention and a sliding window (``hf_mistral``), all from small configs with
random weights (nothing is downloaded). The full size makes activations
dominate (4 layers, 3 for OPT and Mistral, width 256, sequence 256, batch 4,
vocabulary 4096); ``--quick`` uses the zoo's own tiny sizes.

Every model computes its own loss from ``labels``, and every method runs the
step a user writes, in one process, with one thread, under
``profiler.meter.MemoryMeter("cpu")`` (peak bytes above the start of the
step: activations, temporaries and gradients; not parameters or inputs):

- plain autograd: ``model(**batch).loss.backward()``;
- Hugging Face's ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``
  (one checkpoint per layer; disabled again afterwards);
- rematc called the ordinary way, ``Rockmate(model, batch, budget, cache=False)``
  then ``rm(**batch).loss.backward()``: at its smallest feasible budget (a
  1-byte budget raises ``BudgetTooSmall``, whose ``min_budget_bytes`` is the
  minimum), at checkpointing's measured peak, and without rematerialization
  (budget 1.0);
- rematc with ``loss_fn=lambda o: o.loss`` (``rm(**batch)`` returns the loss):
  the same two budgets.

Each method runs one warm-up step and one metered step (its gradients are
compared with plain autograd's: same weights, batch and dropout masks); then
all methods are timed round-robin, one step each per round (``--reps``
rounds), and the median of the process's CPU time is divided by plain
autograd's. Outputs: the table on stdout, ``--json``, and with ``--readme``
the section of that file between ``<!-- checkpointing-table:begin -->`` and
``<!-- checkpointing-table:end -->`` (inserted at the end of its
``## Benchmarks`` section if absent).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import rematc  # noqa: E402
from benchmarks.report import git_revision, machine_description  # noqa: E402
from profiler.meter import MemoryMeter  # noqa: E402

MIB = 1024 * 1024
README_BEGIN = "<!-- checkpointing-table:begin -->"
README_END = "<!-- checkpointing-table:end -->"
SEED = 1234  # the same dropout masks in every method's metered step
ALL_MODELS = ("hf_gpt2", "hf_llama", "hf_bert", "hf_vit", "hf_opt", "hf_mistral")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    layers: int
    width: int
    seq: int
    batch: int
    vocab: int
    image: int  # ViT image side; patches of 4 pixels


FULL = Size(layers=4, width=256, seq=256, batch=4, vocab=4096, image=64)
QUICK = Size(layers=2, width=32, seq=16, batch=2, vocab=128, image=16)  # the zoo's sizes (tests/zoo_models.py)


@dataclass(frozen=True)
class Spec:
    """One model: how to build it (random weights from the current seed) and its batch of keyword arguments."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[], dict[str, torch.Tensor]]


def _tokens(size: Size) -> torch.Tensor:
    return torch.randint(0, size.vocab, (size.batch, size.seq), generator=torch.Generator().manual_seed(0))


def _lm_batch(size: Size) -> Callable[[], dict[str, torch.Tensor]]:
    def make() -> dict[str, torch.Tensor]:
        ids = _tokens(size)
        return {"input_ids": ids, "labels": ids}

    return make


def specs(size: Size) -> dict[str, Spec]:
    """The models at ``size``; configs follow ``tests/zoo_models.py`` (OPT and Mistral are this file's)."""
    import transformers as T

    s = size
    lm = f"batch {s.batch} x seq {s.seq}, vocab {s.vocab}"

    def gpt2() -> nn.Module:
        config = T.GPT2Config(
            vocab_size=s.vocab, n_positions=s.seq, n_embd=s.width, n_layer=s.layers, n_head=max(2, s.width // 64),
            bos_token_id=0, eos_token_id=0, use_cache=False,
        )
        return T.GPT2LMHeadModel(config).train()

    def llama() -> nn.Module:
        heads = max(4, s.width // 32)
        config = T.LlamaConfig(
            vocab_size=s.vocab, hidden_size=s.width, intermediate_size=2 * s.width, num_hidden_layers=s.layers,
            num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=s.seq,
            attention_dropout=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=None, use_cache=False,
        )
        return T.LlamaForCausalLM(config).train()

    def bert() -> nn.Module:
        config = T.BertConfig(
            vocab_size=s.vocab, hidden_size=s.width, num_hidden_layers=s.layers, num_attention_heads=max(2, s.width // 64),
            intermediate_size=(2 if s is QUICK else 4) * s.width, max_position_embeddings=s.seq, type_vocab_size=2,
            num_labels=3, pad_token_id=0,
        )
        return T.BertForSequenceClassification(config).train()

    def bert_batch() -> dict[str, torch.Tensor]:
        ids = _tokens(s)
        attention_mask = torch.ones_like(ids)
        attention_mask[-1, s.seq * 5 // 8:] = 0  # the last sequence is padded
        token_type_ids = torch.zeros_like(ids)
        token_type_ids[:, s.seq // 2:] = 1  # sentence pairs
        labels = torch.randint(0, 3, (s.batch,), generator=torch.Generator().manual_seed(1))
        return {"input_ids": ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids, "labels": labels}

    def vit() -> nn.Module:
        config = T.ViTConfig(
            image_size=s.image, patch_size=4, num_channels=3, hidden_size=s.width, num_hidden_layers=s.layers,
            num_attention_heads=max(2, s.width // 64), intermediate_size=(2 if s is QUICK else 4) * s.width,
            num_labels=5, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        )
        return T.ViTForImageClassification(config).train()

    def vit_batch() -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(s.batch, 3, s.image, s.image, generator=g),
                "labels": torch.randint(0, 5, (s.batch,), generator=g)}

    small_layers = min(s.layers, 3)

    def opt() -> nn.Module:
        config = T.OPTConfig(
            vocab_size=s.vocab, hidden_size=s.width, num_hidden_layers=small_layers, ffn_dim=4 * s.width,
            num_attention_heads=max(2, s.width // 64), max_position_embeddings=s.seq, word_embed_proj_dim=s.width,
            dropout=0.1, attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=0, use_cache=False,
        )
        return T.OPTForCausalLM(config).train()

    window = s.seq // 2

    def mistral() -> nn.Module:
        heads = max(4, s.width // 32)
        config = T.MistralConfig(
            vocab_size=s.vocab, hidden_size=s.width, intermediate_size=2 * s.width, num_hidden_layers=small_layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), sliding_window=window,
            max_position_embeddings=s.seq, attention_dropout=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=None,
            use_cache=False,
        )
        return T.MistralForCausalLM(config).train()

    vit_tokens = (s.image // 4) ** 2 + 1
    gqa_heads = max(4, s.width // 32)
    all_specs = [
        Spec("hf_gpt2", f"GPT2LMHeadModel (tied LM head), {s.layers} layers, n_embd {s.width}, {lm}", gpt2, _lm_batch(s)),
        Spec("hf_llama", f"LlamaForCausalLM, {s.layers} layers, hidden {s.width}, {gqa_heads} heads / {gqa_heads // 2} KV heads, "
             f"attention_dropout 0.1, {lm}", llama, _lm_batch(s)),
        Spec("hf_bert", f"BertForSequenceClassification, {s.layers} layers, hidden {s.width}, padding mask, "
             f"batch {s.batch} x seq {s.seq}", bert, bert_batch),
        Spec("hf_vit", f"ViTForImageClassification, {s.layers} layers, hidden {s.width}, "
             f"batch {s.batch} x {vit_tokens} tokens ({s.image}x{s.image} image, patch 4)", vit, vit_batch),
        Spec("hf_opt", f"OPTForCausalLM, {small_layers} layers, hidden {s.width}, ffn {4 * s.width}, {lm}", opt, _lm_batch(s)),
        Spec("hf_mistral", f"MistralForCausalLM, {small_layers} layers, hidden {s.width}, {gqa_heads} heads / "
             f"{max(1, gqa_heads // 4)} KV heads, sliding_window {window}, attention_dropout 0.1, {lm}", mistral, _lm_batch(s)),
    ]
    return {spec.name: spec for spec in all_specs}


# -- methods -----------------------------------------------------------------------------------


@dataclass
class Measured:
    """One method on one model; figures are None when it did not run (``status`` says why)."""

    key: str
    status: str = "ok"  # "ok", "infeasible", "failed: ..."
    budget_bytes: int | None = None
    min_budget_bytes: int | None = None
    peak_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    plan_seconds: float | None = None
    grad_max_diff: float | None = None
    step_seconds: float | None = None  # median CPU time of a step
    wall_seconds: float | None = None
    time_ratio: float | None = None  # step_seconds / plain's
    step_samples: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Method:
    """A model (own copy of the weights) and its training step."""

    def __init__(self, model: nn.Module, step: Callable[[], None], params: nn.Module) -> None:
        self.model = model
        self.step = step
        self.params = params  # where the gradients land


def _grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in module.parameters()]


def _max_diff(got: list[torch.Tensor | None], want: list[torch.Tensor | None]) -> float:
    if len(got) != len(want):
        return math.inf
    worst = 0.0
    for g, w in zip(got, want):
        if (g is None) != (w is None):
            return math.inf
        if g is not None:
            worst = max(worst, (g.float() - w.float()).abs().max().item())
    return worst


def _error_text(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"failed: {type(error).__name__}: {(lines[0] if lines else '')[:160]}"


def _loss_of_output(output: Any) -> torch.Tensor:
    return output.loss


class ModelBench:
    """All methods on one model: build, warm up, meter (peak, gradients), then time round-robin."""

    def __init__(self, spec: Spec, options: argparse.Namespace) -> None:
        self.spec = spec
        self.options = options
        torch.manual_seed(0)
        self.base = spec.make_model()
        self.batch = spec.make_batch()
        self.results: dict[str, Measured] = {}
        self.methods: dict[str, Method] = {}
        self.reference: list[torch.Tensor | None] | None = None

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.base).train()

    # -- running a method -------------------------------------------------------------------
    def _metered(self, method: Method) -> int:
        method.params.zero_grad(set_to_none=True)
        gc.collect()
        torch.manual_seed(SEED)
        with MemoryMeter("cpu") as meter:
            method.step()
        return meter.peak_bytes

    def add(self, result: Measured, build: Callable[[], Method]) -> Measured:
        """Build (plan) a method, run a warm-up and a metered step; a failure is a result, not a crash."""
        self.results[result.key] = result
        log(f"{self.spec.name}: {result.key}" + ("" if result.budget_bytes is None else f" (budget {result.budget_bytes} B)"))
        try:
            method = build()
            method.params.zero_grad(set_to_none=True)
            method.step()  # warm-up
            result.peak_bytes = self._metered(method)
            grads = _grads(method.params)
            if self.reference is None:
                self.reference = grads
            result.grad_max_diff = _max_diff(grads, self.reference)
        except rematc.BudgetTooSmall as error:
            result.status = "infeasible"
            result.min_budget_bytes = error.min_budget_bytes
            log(f"  -> infeasible, min {error.min_budget_bytes} B")
            return result
        except Exception as error:  # noqa: BLE001 - recorded in the table
            result.status = _error_text(error)
            if self.options.verbose:
                traceback.print_exc()
            log(f"  -> {result.status}")
            return result
        self.methods[result.key] = method
        log(f"  -> peak {result.peak_bytes / MIB:.2f} MiB, grad diff {result.grad_max_diff:.2g}"
            + ("" if result.plan_seconds is None else f", plan {result.plan_seconds:.1f} s"))
        return result

    def plain(self) -> Method:
        model = self.fresh()

        def step() -> None:
            model(**self.batch).loss.backward()

        return Method(model, step, model)

    def checkpointed(self) -> Method:
        model = self.fresh()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def step() -> None:
            model(**self.batch).loss.backward()

        return Method(model, step, model)

    def rockmate(self, result: Measured, budget: int | float, with_loss_fn: bool) -> Method:
        model = self.fresh()
        loss_fn = (lambda o: o.loss) if with_loss_fn else None
        started = time.perf_counter()
        rm = rematc.Rockmate(model, self.batch, budget, cache=False, loss_fn=loss_fn)
        result.plan_seconds = time.perf_counter() - started
        result.predicted_peak_bytes = rm.predicted_peak_bytes
        result.budget_bytes = rm.budget_bytes

        if with_loss_fn:
            def step() -> None:
                rm(**self.batch).backward()
        else:
            def step() -> None:
                rm(**self.batch).loss.backward()

        return Method(rm, step, model)

    def min_budget(self, with_loss_fn: bool) -> tuple[int | None, str | None]:
        """rematc's smallest feasible budget: plan at 1 byte and read ``BudgetTooSmall.min_budget_bytes``."""
        loss_fn = (lambda o: o.loss) if with_loss_fn else None
        try:
            rematc.Rockmate(self.fresh(), self.batch, 1, cache=False, loss_fn=loss_fn)
        except rematc.BudgetTooSmall as error:
            return error.min_budget_bytes, None
        except Exception as error:  # noqa: BLE001
            if self.options.verbose:
                traceback.print_exc()
            return None, _error_text(error)
        return 1, None

    # -- the benchmark --------------------------------------------------------------------------
    def run(self) -> None:
        plain = self.add(Measured("plain"), self.plain)
        if not plain.ok:
            raise RuntimeError(f"plain autograd failed on {self.spec.name}: {plain.status}")
        checkpoint = self.add(Measured("checkpoint"), self.checkpointed)
        checkpoint_peak = checkpoint.peak_bytes if checkpoint.ok else None
        for prefix, with_loss_fn in (("rematc", False), ("rematc_loss_fn", True)):
            log(f"{self.spec.name}: {prefix} minimum (1-byte budget)")
            min_bytes, error = self.min_budget(with_loss_fn)
            if min_bytes is None:
                self.results[f"{prefix}_min"] = Measured(f"{prefix}_min", status=error or "failed")
                log(f"  -> {error}")
            else:
                log(f"  -> min {min_bytes} B")
                row = Measured(f"{prefix}_min", budget_bytes=min_bytes, min_budget_bytes=min_bytes)
                self.add(row, lambda r=row, b=min_bytes, lf=with_loss_fn: self.rockmate(r, b, lf))
            key = f"{prefix}_at_checkpoint"
            if checkpoint_peak is None:
                self.results[key] = Measured(key, status="failed: no checkpointing peak")
            elif min_bytes is not None and checkpoint_peak < min_bytes:
                self.results[key] = Measured(key, status="infeasible", budget_bytes=checkpoint_peak,
                                             min_budget_bytes=min_bytes)
                log(f"{self.spec.name}: {key}: infeasible (budget {checkpoint_peak} B < min {min_bytes} B)")
            else:
                row = Measured(key, budget_bytes=checkpoint_peak)
                self.add(row, lambda r=row, b=checkpoint_peak, lf=with_loss_fn: self.rockmate(r, b, lf))
                if row.status == "infeasible" and row.min_budget_bytes is None:
                    row.min_budget_bytes = min_bytes
        row = Measured("rematc_no_remat")
        self.add(row, lambda r=row: self.rockmate(r, 1.0, False))

    def time_round_robin(self, rounds: int) -> None:
        """One step of every method per round, starting one method later each round; medians."""
        keys = list(self.methods)
        cpu: dict[str, list[float]] = {k: [] for k in keys}
        wall: dict[str, list[float]] = {k: [] for k in keys}
        log(f"{self.spec.name}: timing {len(keys)} methods x {rounds} rounds")
        gc.collect()
        gc.disable()  # a collection inside one method's step would be charged to it
        try:
            for r in range(rounds):
                for offset in range(len(keys)):
                    key = keys[(r + offset) % len(keys)]
                    method = self.methods[key]
                    method.params.zero_grad(set_to_none=True)
                    started_wall, started_cpu = time.perf_counter(), time.process_time()
                    method.step()
                    cpu[key].append(time.process_time() - started_cpu)
                    wall[key].append(time.perf_counter() - started_wall)
        finally:
            gc.enable()
        for key in keys:
            result = self.results[key]
            result.step_samples = cpu[key]
            result.step_seconds = statistics.median(cpu[key])
            result.wall_seconds = statistics.median(wall[key])
        plain = self.results["plain"]
        for key in keys:
            assert plain.step_seconds
            self.results[key].time_ratio = self.results[key].step_seconds / plain.step_seconds
        checkpoint = self.methods.get("checkpoint")
        if checkpoint is not None:  # transformers 5 renamed the disabling call
            model = checkpoint.model
            getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
        self.methods.clear()


# -- the table -------------------------------------------------------------------------------------


COLUMNS = (
    "model",
    "plain peak (MiB)",
    "checkpointing peak / plain",
    "checkpointing overhead",
    "rematc min peak / plain",
    "rematc min overhead",
    "rematc overhead at checkpointing's peak",
    "rematc no-remat peak / plain",
    "rematc (loss_fn) min peak / plain",
    "rematc (loss_fn) min overhead",
    "rematc (loss_fn) overhead at checkpointing's peak",
)


def _fraction(value: int | None, plain: int) -> str:
    return "" if value is None else f"{value / plain:.3f}"


def _ratio(result: Measured) -> str:
    return "" if result.time_ratio is None else f"{result.time_ratio:.2f}x"


def _failure(result: Measured, plain: int) -> str:
    if result.status == "infeasible":
        return f"infeasible (min {_fraction(result.min_budget_bytes, plain)})" if result.min_budget_bytes else "infeasible"
    return result.status.replace("|", "/")


def _peak_cell(result: Measured, plain: int) -> str:
    return _fraction(result.peak_bytes, plain) if result.ok else _failure(result, plain)


def _overhead_cell(result: Measured, plain: int) -> str:
    return _ratio(result) if result.ok else _failure(result, plain)


def table_row(name: str, results: dict[str, Measured]) -> list[str]:
    """The cells of one model's line (see :data:`COLUMNS`)."""
    plain = results["plain"].peak_bytes
    assert plain
    r = results
    return [
        name,
        f"{plain / MIB:.2f}",
        _peak_cell(r["checkpoint"], plain),
        _overhead_cell(r["checkpoint"], plain),
        _peak_cell(r["rematc_min"], plain),
        _overhead_cell(r["rematc_min"], plain),
        _overhead_cell(r["rematc_at_checkpoint"], plain),
        _peak_cell(r["rematc_no_remat"], plain),
        _peak_cell(r["rematc_loss_fn_min"], plain),
        _overhead_cell(r["rematc_loss_fn_min"], plain),
        _overhead_cell(r["rematc_loss_fn_at_checkpoint"], plain),
    ]


def markdown_table(results: dict[str, dict[str, Measured]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "--:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(table_row(name, rows)) + " |" for name, rows in results.items()]
    return "\n".join(lines)


def report_text(results: dict[str, dict[str, Measured]], descriptions: dict[str, str], command: str,
                seconds: float, options: argparse.Namespace) -> str:
    """The README section: heading, what was measured, the table, the command under it."""
    notes = []
    for name, rows in results.items():
        plain = rows["plain"].peak_bytes or 1
        at = rows["rematc_at_checkpoint"]
        if at.ok:
            notes.append(f"{name}: at checkpointing's peak rematc measured {_fraction(at.peak_bytes, plain)} of plain")
        over = [r.key for r in rows.values() if r.ok and r.budget_bytes is not None and (r.peak_bytes or 0) > r.budget_bytes]
        if over:
            notes.append(f"{name}: **measured above the budget**: {', '.join(over)}")
        diffs = [r.grad_max_diff for r in rows.values() if r.ok and r.grad_max_diff is not None]
        if diffs and max(diffs) > 0:
            notes.append(f"{name}: largest gradient difference from plain autograd {max(diffs):.1e}")
    lines = [
        "### rematc against checkpointing every block (Hugging Face models, called the ordinary way)",
        "",
        "Each model computes its own loss from `labels`. Plain autograd is `model(**batch).loss.backward()`; "
        "checkpointing is `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={\"use_reentrant\": False})`; "
        "rematc is `Rockmate(model, batch, budget, cache=False)` then `rm(**batch).loss.backward()`, and "
        "\"(loss_fn)\" is `Rockmate(..., loss_fn=lambda o: o.loss)` then `rm(**batch).backward()`. "
        "\"min\" is rematc's smallest feasible budget (`BudgetTooSmall.min_budget_bytes` of a 1-byte budget); "
        "\"at checkpointing's peak\" uses checkpointing's measured peak as the budget; \"no-remat\" is budget 1.0. "
        "Peaks are measured by `profiler.meter.MemoryMeter(\"cpu\")` (bytes above the start of the step) as a "
        "fraction of plain autograd's; overheads are the median CPU time of a step "
        f"({options.reps} round-robin rounds, one thread) over plain autograd's. "
        "\"infeasible (min x)\": rematc's minimum is x of the plain peak, above checkpointing's peak.",
        "",
        "Models: " + "; ".join(f"`{n}`: {descriptions[n]}" for n in results) + ".",
        "",
        markdown_table(results),
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min, {datetime.date.today().isoformat()}, git {git_revision()}); "
        f"{machine_description(torch.device('cpu'), 1)}.",
    ]
    if notes:
        lines += [""] + [f"- {note}." for note in notes]
    return "\n".join(lines) + "\n"


def update_readme(path: Path, body: str) -> None:
    """Replace the text between the markers of ``path`` with ``body``.

    If the markers are absent they are inserted at the end of the
    ``## Benchmarks`` section (before the next ``## `` heading, or at the end
    of the file when there is no such section or heading).
    """
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        text = insert_markers(text)
    before, rest = text.split(README_BEGIN, 1)
    _, after = rest.split(README_END, 1)
    path.write_text(before + README_BEGIN + "\n" + body + README_END + after)


def insert_markers(text: str) -> str:
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == "## Benchmarks"), None)
    end = len(lines)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    head = "".join(lines[:end])
    if head and not head.endswith("\n"):
        head += "\n"
    if head and not head.endswith("\n\n"):
        head += "\n"
    block = f"{README_BEGIN}\n{README_END}\n"
    tail = "".join(lines[end:])
    return head + block + ("\n" + tail if tail else "")


# -- main ----------------------------------------------------------------------------------------


def run(options: argparse.Namespace) -> tuple[dict[str, dict[str, Measured]], dict[str, str]]:
    torch.set_num_threads(1)
    available = specs(QUICK if options.quick else FULL)
    results: dict[str, dict[str, Measured]] = {}
    descriptions: dict[str, str] = {}
    for name in options.models:
        spec = available[name]
        bench = ModelBench(spec, options)
        bench.run()
        bench.time_round_robin(options.reps)
        results[name] = bench.results
        descriptions[name] = spec.description
        print(markdown_table({name: bench.results}), flush=True)
        del bench
        gc.collect()
    return results, descriptions


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the zoo's tiny sizes (seconds per model)")
    parser.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated subset of {','.join(ALL_MODELS)}")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds after the warm-up (default 5; 3 with --quick)")
    parser.add_argument("--json", default=None, help="JSON output (default benchmarks/results/checkpointing_cpu[_quick].json)")
    parser.add_argument("--readme", default=None, help=f"replace the section between {README_BEGIN} and {README_END} of this file")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")
    options = parser.parse_args(argv)
    options.argv = argv
    options.models = [m.strip() for m in options.models.split(",") if m.strip()]
    unknown = [m for m in options.models if m not in ALL_MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(ALL_MODELS)}")
    if options.reps is None:
        options.reps = 3 if options.quick else 5
    if options.reps < 1:
        parser.error("--reps must be at least 1")
    if options.json is None:
        options.json = str(ROOT / "benchmarks" / "results" / f"checkpointing_cpu{'_quick' if options.quick else ''}.json")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_arguments(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/checkpointing.py " + " ".join(shlex.quote(a) for a in options.argv)
    started = time.perf_counter()
    results, descriptions = run(options)
    seconds = time.perf_counter() - started
    text = report_text(results, descriptions, command.strip(), seconds, options)
    print(text)
    out = Path(options.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": command.strip(),
        "machine": machine_description(torch.device("cpu"), 1),
        "git": git_revision(),
        "seconds": seconds,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "columns": list(COLUMNS),
        "table": [table_row(name, rows) for name, rows in results.items()],
        "models": {
            name: {"description": descriptions[name], "results": {k: asdict(r) for k, r in rows.items()}}
            for name, rows in results.items()
        },
    }, indent=1))
    log(f"wrote {out}")
    if options.readme:
        update_readme(Path(options.readme), text)
        log(f"updated the table in {options.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
