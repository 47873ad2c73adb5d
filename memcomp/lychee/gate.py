"""LycheeMemory's gate: a LoRA adapter plus a scoring head on the shared backbone that scores each memory block as
related / unrelated to a question (issue 12, deliverable 2; seeds 000 / 001: "a lightweight LoRA classifier on the
shared backbone ... trained separately"; its inputs, labels and threshold are not published -- the design below is
ours).

One copy of the weights. The LoRA factors live in the ``Gate`` module, not in the model: ``with gate.active():``
registers forward hooks on the target linears of the compressor's LM (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
by default; a dense ``nn.Linear`` or an FQLoRA layer alike) that add ``scaling * dropout(x) A^T B^T`` to their
output, and removes them on exit. Outside that block the model is exactly the base model -- the reasoner's
generations are bit-identical with or without a gate, and the compressor's fingerprint (which hashes every tensor
of the base model) does not change when a gate is created, trained or loaded, so block stores stay valid.

Inputs: ``[block memory][question][working memory]`` -- the block's memory embeddings wrapped as the compressor
wraps memory, after the same ChatML header as the reasoner's update prompt, then the problem and the current
working memory (``memcomp.lychee.prompts.GATE``: no chat header, no instruction -- the gate runs on every block, so
its fixed overhead is the tags and the cue), ending in a fixed cue. The head is a linear map ``2d -> 1`` on two final
hidden states (after the final norm): the last position's (with left padding, the cue's last token in every row;
it has attended to the block, the question and the memory) and the mean over the block's memory-embedding positions
(in a causal decoder these see only the block: a question-independent summary of its content). The block term is
there because a small backbone does not carry the block's content to the last position through attention alone:
on the test suite's tiny random Qwen2 (d = 48, 2 layers), synthetic one-hop task (48 training questions, 8 epochs at
lr 1e-2), the same training gave a held-out pre-filter ROC AUC of 0.39 with the last position alone and 0.78 with
both. Why these inputs: the block alone cannot say
whether it matters; with the question the gate can spot facts about the question's entity; with the working memory
it can follow a chain -- for "in which country was X born?" the block "C is in K" is related only once the memory
says X was born in C, which no question-only scorer can know.

Two modes, one head. ``prefilter``: question only (the memory slot holds the fixed "No previous memory" text), so
every block of every question is scored in parallel batches before any reading. ``sequential``: the reasoner's
current working memory, scored just before each block is read. The pre-filter row IS the sequential row at the
start of the walk, so one head serves both, and each mode has its own threshold.

Labels: a block is related when it holds any character of the evidence (a supporting paragraph, the needle, a fact
of the synthetic task; ``memcomp.eval.documents.label_blocks``). A skipped related block is a miss, so recall is
the quantity the threshold controls. The label does not depend on the working memory; training rows pair every
block with "No previous memory" (the pre-filter view) and, where examples provide them, with the ideal working
memory at that block (``GateExample.working_memories``: for the synthetic task, the evidence facts in the related
blocks before it, ``memcomp.eval.synthetic.memory_trace``) -- the sequential view. Binary cross-entropy on the
head's logit, the positives weighted by (negatives / positives) of the training rows (related blocks are rare;
unweighted, the head learns to say "unrelated").

Threshold: chosen per mode on a validation split of the examples (split by question, never by block: blocks of one
question share its wording) as the highest score that keeps recall >= ``target_recall`` (default 0.95) on the
validation rows of that mode: with P related validation blocks, the ceil(target * P)-th highest related score.
Recall on validation is then >= the target by construction; on new data it is an estimate, reported with the
precision and the fraction of blocks skipped.

Persistence (``Gate.save`` / ``Gate.load``): ``gate.safetensors`` (the LoRA factors and the head) and
``gate.json`` (written last, atomically: the configuration, the thresholds, the validation metrics, and the
fingerprint of the compressor it was trained on with its tokenizer's digest). Loading it for another compressor
raises ``MemoryMismatchError``: the head reads hidden states of those exact weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from memcomp.lychee.prompts import NO_MEMORY, Prompts, TextOrIds
from memcomp.lychee.store import tokenizer_digest
from memcomp.memory import Memory, MemoryFileError, MemoryMismatchError

if TYPE_CHECKING:
    from memcomp.compressor import MemoryCompressor

__all__ = ["GateConfig", "GateTrainConfig", "GateExample", "GateMetrics", "GateTrainResult", "Gate", "train_gate",
           "evaluate_gate", "gate_examples_from_synthetic", "MODES"]

MODES = ("prefilter", "sequential")
FORMAT = "memcomp-lychee-gate"
FORMAT_VERSION = 1
WEIGHTS_FILE = "gate.safetensors"
CONFIG_FILE = "gate.json"

BlockMemory = Union[Memory, torch.Tensor]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class GateConfig:
    """The gate's architecture and input budget.

    rank, alpha, dropout:  LoRA rank r, scaling alpha / r, dropout on the LoRA input (training only).
    target_modules:        names of the linears inside each decoder layer that get LoRA.
    question_tokens:       the longest question (in tokens) the gate accepts; longer raises ``ValueError``.
    memory_tokens:         the working memory is cut to its first ``memory_tokens`` tokens (the reasoner's cap).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    question_tokens: int = 1024
    memory_tokens: int = 1024

    def __post_init__(self) -> None:
        for name in ("rank", "question_tokens", "memory_tokens"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"GateConfig.{name} must be an int >= 1, got {v!r}")
        if not _is_real(self.alpha) or self.alpha <= 0:
            raise ValueError(f"GateConfig.alpha must be a number > 0, got {self.alpha!r}")
        if not _is_real(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"GateConfig.dropout must lie in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, Sequence) or not all(
                isinstance(t, str) and t for t in self.target_modules) or not self.target_modules:
            raise ValueError(f"GateConfig.target_modules must be a non-empty tuple of module names, got "
                             f"{self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class GateTrainConfig:
    """How ``train_gate`` trains: ``epochs`` over the training rows in shuffled batches of ``batch_size``, AdamW
    (``lr``, ``weight_decay``) with gradient clipping at ``max_grad_norm``, ``val_fraction`` of the examples held out
    (at least one), the threshold set on them for ``target_recall``, ``balance`` (weight positives by negatives /
    positives), ``seed`` (LoRA init, split, shuffling)."""

    epochs: int = 8
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    val_fraction: float = 0.25
    target_recall: float = 0.95
    balance: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"GateTrainConfig.{name} must be an int >= 1, got {v!r}")
        if not _is_int(self.seed):
            raise ValueError(f"GateTrainConfig.seed must be an int, got {self.seed!r}")
        for name in ("lr", "max_grad_norm"):
            v = getattr(self, name)
            if not _is_real(v) or v <= 0:
                raise ValueError(f"GateTrainConfig.{name} must be a number > 0, got {v!r}")
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"GateTrainConfig.weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not _is_real(self.val_fraction) or not 0 < self.val_fraction < 1:
            raise ValueError(f"GateTrainConfig.val_fraction must lie in (0, 1), got {self.val_fraction!r}")
        if not _is_real(self.target_recall) or not 0 < self.target_recall <= 1:
            raise ValueError(f"GateTrainConfig.target_recall must lie in (0, 1], got {self.target_recall!r}")
        if not isinstance(self.balance, bool):
            raise TypeError(f"GateTrainConfig.balance must be a bool, got {self.balance!r}")


@dataclass(frozen=True)
class GateExample:
    """One question's labelled blocks: ``blocks`` (each a ``Memory`` or embeddings ``[n_k, d]``, in reading
    order), ``related[k]`` (block k holds evidence), and optionally ``working_memories[k]`` (the working memory a
    good reasoner holds when it reaches block k, e.g. the ideal trace; None: every row uses "No previous memory").

    Raises ``ValueError`` for an empty question, no blocks, or lengths that differ; ``TypeError`` for wrong types."""

    question: str
    blocks: tuple[BlockMemory, ...]
    related: tuple[bool, ...]
    working_memories: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"GateExample: the question must be a non-empty str, got {self.question!r}")
        for name in ("blocks", "related") + (("working_memories",) if self.working_memories is not None else ()):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
                raise TypeError(f"GateExample.{name} must be a sequence, got {type(v).__name__}")
            object.__setattr__(self, name, tuple(v))
        if not self.blocks:
            raise ValueError("GateExample: no blocks")
        if len(self.related) != len(self.blocks):
            raise ValueError(f"GateExample: {len(self.blocks)} blocks but {len(self.related)} labels")
        if self.working_memories is not None and len(self.working_memories) != len(self.blocks):
            raise ValueError(f"GateExample: {len(self.blocks)} blocks but {len(self.working_memories)} working "
                             "memories")
        for k, b in enumerate(self.blocks):
            if not isinstance(b, (Memory, torch.Tensor)):
                raise TypeError(f"GateExample: block {k} is a {type(b).__name__}, not a Memory or tensor")
        if not all(isinstance(r, bool) for r in self.related):
            raise TypeError("GateExample: related labels must be bools")
        if self.working_memories is not None and not all(isinstance(m, str) for m in self.working_memories):
            raise TypeError("GateExample: working memories must be str")


@dataclass(frozen=True)
class GateMetrics:
    """The gate at one threshold on a set of rows: ``recall`` (related blocks kept), ``precision`` (kept blocks that
    are related; 1.0 when none is kept), ``skipped`` (fraction of all blocks below the threshold), ``auc`` (ROC AUC
    of the scores: 0.5 is chance; None without both classes), the counts."""

    threshold: float
    recall: float
    precision: float
    skipped: float
    auc: Optional[float]
    num_blocks: int
    num_related: int

    @classmethod
    def of(cls, scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> GateMetrics:
        keep = scores >= threshold
        pos = labels.bool()
        n_pos, n = int(pos.sum()), int(labels.numel())
        tp = int((keep & pos).sum())
        kept = int(keep.sum())
        return cls(threshold=float(threshold), recall=tp / n_pos if n_pos else 1.0,
                   precision=tp / kept if kept else 1.0, skipped=1.0 - kept / n if n else 0.0,
                   auc=_auc(scores, pos), num_blocks=n, num_related=n_pos)


def _auc(scores: torch.Tensor, pos: torch.Tensor) -> Optional[float]:
    """ROC AUC as the Mann-Whitney statistic (ties count one half)."""
    p, q = scores[pos].double(), scores[~pos].double()
    if p.numel() == 0 or q.numel() == 0:
        return None
    greater = (p[:, None] > q[None, :]).double().sum() + 0.5 * (p[:, None] == q[None, :]).double().sum()
    return float(greater / (p.numel() * q.numel()))


def recall_threshold(scores: torch.Tensor, labels: torch.Tensor, target_recall: float) -> float:
    """The highest threshold t with recall(scores >= t) >= ``target_recall``: with P related rows, the
    ceil(target * P)-th highest related score. Raises ``ValueError`` when no row is related."""
    pos = scores[labels.bool()].sort(descending=True).values
    if pos.numel() == 0:
        raise ValueError("recall_threshold: no related block among the rows, so no threshold reaches a recall target")
    k = max(1, math.ceil(target_recall * pos.numel() - 1e-9))
    return float(pos[k - 1])


class _LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        a = torch.empty(rank, in_features)
        bound = 1.0 / math.sqrt(in_features)  # peft's kaiming_uniform(a=sqrt(5)) bound for A
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(out_features, rank))  # zero: the gate starts as the base model


class Gate(nn.Module):
    """The gate for one compressor (see the module docstring).

    ``Gate(compressor, config, seed=0)`` creates an untrained gate (LoRA B = 0, head = 0: every score 0.5, no
    thresholds); ``train_gate`` trains one; ``Gate.load(directory, compressor)`` reads a saved one.

    - ``score(blocks, problems, memories=None, batch_size=64)`` -> ``[N]`` float32 probabilities on CPU, one per
      row (block k with problem k and working memory k; None: "No previous memory" for every row: the pre-filter).
    - ``logits(...)``: the head's logits ``[N]`` float32 with gradients (training).
    - ``thresholds``: ``{"prefilter": t, "sequential": t}`` (None until trained); ``threshold(mode)`` reads one.
    - ``active()``: the context in which the LoRA hooks are on.

    The LoRA factors and the head are fp32 on the compressor's device; the LoRA term is computed in the
    activations' dtype. Raises ``ValueError`` when a target module is missing from the model."""

    def __init__(self, compressor: MemoryCompressor, config: Optional[GateConfig] = None, *, seed: int = 0) -> None:
        super().__init__()
        config = config if config is not None else GateConfig()
        if not isinstance(config, GateConfig):
            raise TypeError(f"Gate: config must be a GateConfig, got {type(config).__name__}")
        self.config = config
        self._compressor = [compressor]  # a list: not registered as a submodule (the gate saves its own tensors)
        self.prompts = Prompts(compressor.tokenizer)
        generator = torch.Generator().manual_seed(int(seed))
        names: list[str] = []
        loras = {}
        for name, module in compressor.model.named_modules():
            if name.rsplit(".", 1)[-1] in config.target_modules and hasattr(module, "in_features"):
                names.append(name)
                loras[name.replace(".", "__")] = _LoRA(module.in_features, module.out_features, config.rank,
                                                       generator)
        found = {n.rsplit(".", 1)[-1] for n in names}
        missing = sorted(set(config.target_modules) - found)
        if missing:
            raise ValueError(f"Gate: the model has no linear named {missing} (target_modules="
                             f"{config.target_modules})")
        self.module_names = tuple(names)
        self.lora = nn.ModuleDict(loras)
        self.head = nn.Linear(2 * compressor.hidden_size, 1)  # [last position ; mean over the block's memory slots]
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.to(compressor.device)
        self.thresholds: dict[str, Optional[float]] = {m: None for m in MODES}
        self.target_recall: Optional[float] = None
        self.metrics: dict[str, Any] = {}
        self.fingerprint = compressor.fingerprint()
        self.tokenizer_sha256 = tokenizer_digest(compressor.tokenizer)
        self._active = 0

    @property
    def compressor(self) -> MemoryCompressor:
        return self._compressor[0]

    def threshold(self, mode: str) -> float:
        """The saved threshold of ``mode``. Raises ``ValueError`` for an unknown mode or an untrained gate."""
        if mode not in MODES:
            raise ValueError(f"gate mode must be one of {MODES}, got {mode!r}")
        t = self.thresholds[mode]
        if t is None:
            raise ValueError(f"this gate has no {mode} threshold (untrained: use train_gate, or pass a threshold)")
        return t

    def check_compressor(self, compressor: MemoryCompressor) -> None:
        """Raise ``MemoryMismatchError`` unless ``compressor`` has the weights and vocabulary the gate was trained
        on."""
        self._check_weights(compressor)
        if tokenizer_digest(compressor.tokenizer) != self.tokenizer_sha256:
            raise MemoryMismatchError("the gate was trained with another tokenizer vocabulary than this compressor's")

    def _check_weights(self, compressor: MemoryCompressor) -> None:
        # The fingerprint is cached until a weight changes: cheap enough for every scoring call (the vocabulary
        # digest, which sorts the whole vocabulary, is checked once, when the gate meets a compressor).
        fp = compressor.fingerprint()
        if fp != self.fingerprint:
            raise MemoryMismatchError(f"the gate was trained for compressor {self.fingerprint}, this compressor is "
                                      f"{fp}: its head reads hidden states of other weights; train a gate for it")

    # -- the adapter switch ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """LoRA on inside the block, off after it (hooks removed even on error); nesting is allowed."""
        if self._active:
            self._active += 1
            try:
                yield
            finally:
                self._active -= 1
            return
        model = self.compressor.model
        handles = []
        try:
            for name in self.module_names:
                handles.append(model.get_submodule(name).register_forward_hook(
                    self._hook(self.lora[name.replace(".", "__")])))
            self._active = 1
            yield
        finally:
            self._active = 0
            for h in handles:
                h.remove()

    def _hook(self, lora: _LoRA):
        scaling, p = self.config.scaling, self.config.dropout

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if p > 0 and self.training:
                x = F.dropout(x, p, True)
            return output + scaling * F.linear(F.linear(x, lora.A.to(x.dtype)), lora.B.to(x.dtype))

        return hook

    # -- inputs ---------------------------------------------------------------------------------------------------

    def question_ids(self, problem: TextOrIds, where: str = "question") -> list[int]:
        """The question as ids, checked against ``question_tokens``. Raises ``ValueError`` for an empty or too long
        question."""
        ids = self.prompts.ids_of(problem, where)
        if not ids:
            raise ValueError(f"{where} is empty")
        if len(ids) > self.config.question_tokens:
            raise ValueError(f"{where} is {len(ids)} tokens, longer than the gate's question budget of "
                             f"{self.config.question_tokens} (GateConfig.question_tokens)")
        return ids

    def prompt_ids(self, problem: TextOrIds, memory: Optional[TextOrIds]) -> tuple[list[int], list[int]]:
        """``(prefix_ids, prompt_ids)`` of one row: the memory is cut to its first ``memory_tokens`` tokens."""
        mem = self.prompts.no_memory_ids if memory is None else self.prompts.ids_of(memory, "working memory")
        return self.prompts.gate(self.question_ids(problem), mem[: self.config.memory_tokens])

    def logits(self, blocks: Sequence[BlockMemory], problems: Sequence[TextOrIds],
               memories: Optional[Sequence[Optional[TextOrIds]]] = None) -> torch.Tensor:
        """The head's logits ``[N]`` float32 for N rows, in one forward pass, with gradients to the LoRA factors and
        the head (none to the backbone unless its parameters require them). Raises ``ValueError`` for lengths that
        differ, ``MemoryMismatchError`` for a block of another compressor."""
        comp = self.compressor
        if memories is None:
            memories = [None] * len(blocks)
        if not (len(blocks) == len(problems) == len(memories)) or not blocks:
            raise ValueError(f"Gate: {len(blocks)} blocks, {len(problems)} problems and {len(memories)} memories; "
                             "one of each per row, at least one row")
        rows = [self.prompt_ids(p, m) for p, m in zip(problems, memories)]
        batch = comp.build_decoder_inputs(list(blocks), [r[1] for r in rows], padding_side="left",
                                          prefixes=[r[0] for r in rows])
        with self.active():
            hidden = comp.base(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids, use_cache=False).last_hidden_state
        B, L, _ = hidden.shape
        weights = torch.zeros(B, L, device=hidden.device)  # 1 / n_b on row b's memory slots: their mean
        for b, pos in enumerate(batch.memory_positions):
            if pos.numel():
                weights[b, pos.to(hidden.device)] = 1.0 / pos.numel()
        block = torch.einsum("bl,bld->bd", weights, hidden.float())
        # Left padding: position -1 is every row's last real token. The head runs in fp32.
        return self.head(torch.cat([hidden[:, -1].float(), block], dim=-1))[:, 0]

    @torch.no_grad()
    def score(self, blocks: Sequence[BlockMemory], problems: Sequence[TextOrIds],
              memories: Optional[Sequence[Optional[TextOrIds]]] = None, *, batch_size: int = 64) -> torch.Tensor:
        """Probabilities ``[N]`` float32 on CPU (sigmoid of ``logits``), ``batch_size`` rows per forward pass, with
        the gate and the backbone in eval mode (restored after). Raises as ``logits``, plus
        ``MemoryMismatchError`` when the compressor's weights changed since the gate was trained."""
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"Gate.score: batch_size must be an int >= 1, got {batch_size!r}")
        self._check_weights(self.compressor)
        if memories is None:
            memories = [None] * len(blocks)
        if not (len(blocks) == len(problems) == len(memories)) or not blocks:
            raise ValueError(f"Gate.score: {len(blocks)} blocks, {len(problems)} problems and {len(memories)} "
                             "memories; one of each per row, at least one row")
        with _eval_mode(self, self.compressor):
            out = [torch.sigmoid(self.logits(blocks[s:s + batch_size], problems[s:s + batch_size],
                                             memories[s:s + batch_size])).cpu()
                   for s in range(0, len(blocks), batch_size)]
        return torch.cat(out)

    # -- persistence ----------------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """``gate.safetensors`` + ``gate.json`` (written last: an interrupted save never looks complete)."""
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        marker = os.path.join(directory, CONFIG_FILE)
        if os.path.exists(marker):
            os.remove(marker)
        weights = os.path.join(directory, WEIGHTS_FILE)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, weights + ".tmp",
                  metadata={"format": FORMAT, "fingerprint": self.fingerprint})
        os.replace(weights + ".tmp", weights)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": asdict(self.config),
                "module_names": list(self.module_names), "fingerprint": self.fingerprint,
                "hidden_size": self.compressor.hidden_size, "tokenizer_sha256": self.tokenizer_sha256,
                "thresholds": self.thresholds, "target_recall": self.target_recall, "metrics": self.metrics}
        with open(marker + ".tmp", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(marker + ".tmp", marker)

    @classmethod
    def load(cls, directory: str | os.PathLike, compressor: MemoryCompressor) -> Gate:
        """Read a saved gate for ``compressor``. Raises ``MemoryMismatchError`` when it was trained for another
        compressor (fingerprint, hidden size or tokenizer), ``MemoryFileError`` for a missing, incomplete or foreign
        directory or a weights file that does not match its config."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = os.fspath(directory)
        marker = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(marker):
            raise MemoryFileError(f"no gate in {directory} ({CONFIG_FILE} not found: not saved, or the save did not "
                                  "finish)")
        try:
            with open(marker) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise MemoryFileError(f"{marker} is not a readable gate config ({exc})") from exc
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt != FORMAT:
            raise MemoryFileError(f"{marker} is not a memcomp gate (format={fmt!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise MemoryFileError(f"{marker}: format_version {meta.get('format_version')!r}, this memcomp reads "
                                  f"{FORMAT_VERSION}")
        missing = [k for k in ("config", "module_names", "fingerprint", "hidden_size", "tokenizer_sha256",
                               "thresholds", "target_recall", "metrics") if k not in meta]
        if missing:
            raise MemoryFileError(f"{marker} is corrupt: it lacks {missing}")
        if meta["hidden_size"] != compressor.hidden_size:
            raise MemoryMismatchError(f"the gate in {directory} was trained for hidden size {meta['hidden_size']}, "
                                      f"this compressor's is {compressor.hidden_size}")
        fp = compressor.fingerprint()
        if meta["fingerprint"] != fp:
            raise MemoryMismatchError(f"the gate in {directory} was trained for compressor {meta['fingerprint']}, "
                                      f"this compressor is {fp}: its head reads hidden states of other weights; "
                                      "train a gate for this compressor")
        if meta["tokenizer_sha256"] != tokenizer_digest(compressor.tokenizer):
            raise MemoryMismatchError(f"the gate in {directory} was trained with another tokenizer vocabulary")
        try:
            config = GateConfig(**{**meta["config"], "target_modules": tuple(meta["config"]["target_modules"])})
        except (TypeError, ValueError, KeyError) as exc:
            raise MemoryFileError(f"{marker} holds an invalid gate config ({exc})") from exc
        gate = cls(compressor, config)
        if tuple(meta["module_names"]) != gate.module_names:
            raise MemoryFileError(f"the gate in {directory} adapts modules {meta['module_names'][:3]}..., this model "
                                  f"has {list(gate.module_names[:3])}...")
        try:
            state = load_file(os.path.join(directory, WEIGHTS_FILE), device=str(compressor.device))
            gate.load_state_dict(state)
        except (OSError, SafetensorError, RuntimeError) as exc:
            raise MemoryFileError(f"cannot read the gate weights in {directory}: {exc}") from exc
        gate.thresholds = {m: meta["thresholds"].get(m) for m in MODES}
        gate.target_recall = meta["target_recall"]
        gate.metrics = meta["metrics"]
        return gate


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    saved = [(m, m.training) for root in modules for m in root.modules()]
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


@contextlib.contextmanager
def _frozen_backbone(compressor: MemoryCompressor) -> Iterator[None]:
    """No gradients into the compressor while the gate trains (restored after)."""
    params = list(compressor.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)


@dataclass(frozen=True)
class _Row:
    block: BlockMemory
    question: str
    memory: Optional[str]  # None: "No previous memory"
    label: bool


def _rows(examples: Sequence[GateExample]) -> dict[str, list[_Row]]:
    """The rows of each mode's view: pre-filter (every block with no memory) and sequential (every block with its
    working memory, which is the pre-filter row where the memory is still empty)."""
    pre, seq = [], []
    for ex in examples:
        for k, (b, y) in enumerate(zip(ex.blocks, ex.related)):
            pre.append(_Row(b, ex.question, None, y))
            m = ex.working_memories[k] if ex.working_memories is not None else None
            seq.append(_Row(b, ex.question, None if m in (None, NO_MEMORY) else m, y))
    return {"prefilter": pre, "sequential": seq}


def _training_rows(views: dict[str, list[_Row]]) -> list[_Row]:
    out, seen = [], set()
    for r in views["prefilter"] + views["sequential"]:
        key = (id(r.block), r.question, r.memory)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _score_rows(gate: Gate, rows: Sequence[_Row], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = gate.score([r.block for r in rows], [r.question for r in rows], [r.memory for r in rows],
                        batch_size=batch_size)
    return scores, torch.tensor([r.label for r in rows])


def _mean_loss(gate: Gate, rows: Sequence[_Row], pos_weight: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    with torch.no_grad(), _eval_mode(gate, gate.compressor):
        for s in range(0, len(rows), batch_size):
            part = rows[s:s + batch_size]
            logits = gate.logits([r.block for r in part], [r.question for r in part], [r.memory for r in part])
            labels = torch.tensor([float(r.label) for r in part], device=logits.device)
            total += float(F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight,
                                                              reduction="sum"))
    return total / len(rows)


@dataclass
class GateTrainResult:
    """What ``train_gate`` returns: the trained ``gate`` (thresholds set), the per-step training ``losses``, the
    validation loss before and after training (the same weighted BCE, mean over the validation rows), validation
    ``metrics`` per mode at the chosen thresholds, the example counts and the seconds it took."""

    gate: Gate
    losses: list[float]
    val_loss_before: float
    val_loss_after: float
    metrics: dict[str, GateMetrics]
    num_train_examples: int
    num_val_examples: int
    seconds: float
    train_indices: tuple[int, ...] = field(default=())
    val_indices: tuple[int, ...] = field(default=())


def train_gate(compressor: MemoryCompressor, examples: Sequence[GateExample], *,
               config: Optional[GateConfig] = None, train: Optional[GateTrainConfig] = None,
               out_dir: Optional[str | os.PathLike] = None, progress: Optional[bool] = None) -> GateTrainResult:
    """Train a gate for ``compressor`` on labelled blocks (see the module docstring for inputs, labels, loss and
    threshold), then save it to ``out_dir`` when given. ``progress``: a bar over the training batches with the
    running loss (None: on a terminal only, as the compressor's ``progress`` setting says).

    The examples are split by question: ``round(val_fraction * n)`` of them (at least one) are held out for the
    validation loss and the thresholds; the rest train. The backbone is frozen and in eval mode throughout (its
    ``requires_grad`` flags and modes restored after).

    Raises ``ValueError`` for fewer than two examples, a split whose training or validation rows lack a related
    block (no threshold can target recall without positives), or examples of another hidden size;
    ``MemoryMismatchError`` for ``Memory`` blocks of another compressor."""
    t0 = time.perf_counter()
    train = train if train is not None else GateTrainConfig()
    if not isinstance(train, GateTrainConfig):
        raise TypeError(f"train_gate: train must be a GateTrainConfig, got {type(train).__name__}")
    if isinstance(examples, GateExample) or not isinstance(examples, Sequence):
        raise TypeError("train_gate: examples must be a list of GateExample")
    examples = list(examples)
    for i, ex in enumerate(examples):
        if not isinstance(ex, GateExample):
            raise TypeError(f"train_gate: example {i} is a {type(ex).__name__}, not a GateExample")
    if len(examples) < 2:
        raise ValueError(f"train_gate: {len(examples)} example(s); at least two are needed (one to train, one to set "
                         "the threshold on)")
    order = list(range(len(examples)))
    random.Random(train.seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(train.val_fraction * len(examples))))
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    train_views = _rows([examples[i] for i in train_idx])
    val_views = _rows([examples[i] for i in val_idx])
    rows = _training_rows(train_views)
    n_pos = sum(r.label for r in rows)
    if n_pos == 0:
        raise ValueError("train_gate: no related block among the training examples")
    for mode in MODES:
        if not any(r.label for r in val_views[mode]):
            raise ValueError("train_gate: no related block among the validation examples; pass more examples or a "
                             "larger val_fraction")

    gate = Gate(compressor, config, seed=train.seed)
    device = compressor.device
    pos_weight = torch.tensor((len(rows) - n_pos) / n_pos if train.balance else 1.0, device=device)
    val_rows = _training_rows(val_views)
    with _frozen_backbone(compressor), _eval_mode(compressor):
        val_before = _mean_loss(gate, val_rows, pos_weight, train.batch_size)
        opt = torch.optim.AdamW(gate.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        rng = random.Random(train.seed + 1)
        losses: list[float] = []
        gate.train()
        from tqdm.auto import tqdm

        show = progress if progress is not None else compressor.config.progress
        bar = tqdm(total=train.epochs * math.ceil(len(rows) / train.batch_size), desc="gate training", unit="batch",
                   disable=show is False, delay=0 if show else 2.0)
        for _ in range(train.epochs):
            perm = list(range(len(rows)))
            rng.shuffle(perm)
            for s in range(0, len(perm), train.batch_size):
                part = [rows[i] for i in perm[s:s + train.batch_size]]
                logits = gate.logits([r.block for r in part], [r.question for r in part], [r.memory for r in part])
                labels = torch.tensor([float(r.label) for r in part], device=logits.device)
                loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(gate.parameters(), train.max_grad_norm)
                opt.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.close()
        gate.eval()
        val_after = _mean_loss(gate, val_rows, pos_weight, train.batch_size)
    metrics = {}
    for mode in MODES:
        scores, labels = _score_rows(gate, val_views[mode], train.batch_size)
        t = recall_threshold(scores, labels, train.target_recall)
        gate.thresholds[mode] = t
        metrics[mode] = GateMetrics.of(scores, labels, t)
    gate.target_recall = train.target_recall
    gate.metrics = {"validation": {m: asdict(v) for m, v in metrics.items()}, "val_loss_before": val_before,
                    "val_loss_after": val_after, "train": asdict(train),
                    "num_train_examples": len(train_idx), "num_val_examples": len(val_idx)}
    if out_dir is not None:
        gate.save(out_dir)
    return GateTrainResult(gate=gate, losses=losses, val_loss_before=val_before, val_loss_after=val_after,
                           metrics=metrics, num_train_examples=len(train_idx), num_val_examples=len(val_idx),
                           seconds=time.perf_counter() - t0, train_indices=tuple(train_idx),
                           val_indices=tuple(val_idx))


def evaluate_gate(gate: Gate, examples: Sequence[GateExample], *, batch_size: int = 64,
                  thresholds: Optional[dict[str, float]] = None) -> dict[str, GateMetrics]:
    """The gate's recall, precision, skipped fraction and AUC on ``examples`` (e.g. held-out ones) per mode, at its
    saved thresholds (or ``thresholds``). Raises ``ValueError`` for an untrained gate without ``thresholds``."""
    views = _rows(list(examples))
    out = {}
    for mode in MODES:
        t = thresholds[mode] if thresholds is not None else gate.threshold(mode)
        scores, labels = _score_rows(gate, views[mode], batch_size)
        out[mode] = GateMetrics.of(scores, labels, t)
    return out


def gate_examples_from_synthetic(compressor: MemoryCompressor, examples: Sequence[Any],
                                 block_tokens: int) -> list[GateExample]:
    """``GateExample``s from synthetic examples (``memcomp.eval.synthetic.SyntheticExample``): each context cut
    into blocks of ``block_tokens`` tokens with the compressor's tokenizer (``example_blocks``: block k here is block
    k of a block store of the same text), each block encoded alone (as the store encodes it), labelled related
    when it holds evidence, with the ideal working memory on reaching block k: the facts wholly contained in the
    related blocks before k (``memory_trace``), or "No previous memory".

    Raises ``ValueError`` when ``block_tokens`` is not a positive multiple of the compressor's chunk size."""
    from memcomp.eval.synthetic import SyntheticExample, example_blocks, memory_trace

    C = compressor.config.chunk_size
    if not _is_int(block_tokens) or block_tokens < 1 or block_tokens % C:
        raise ValueError(f"block_tokens={block_tokens!r} must be a positive multiple of the compressor's chunk_size "
                         f"{C} (a block holds whole chunks, as in the block store)")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, SyntheticExample):
            raise TypeError(f"gate_examples_from_synthetic: example {i} is a {type(ex).__name__}, not a "
                            "SyntheticExample")
        blocks = example_blocks(ex, compressor.tokenizer, block_tokens)
        mems = compressor.encode([list(blocks.block_ids(k)) for k in range(blocks.num_blocks)])
        working = []
        for k in range(blocks.num_blocks):
            before = [j for j in range(k) if blocks.related[j]]
            working.append(memory_trace(ex, blocks, before).memories[-1] if before else NO_MEMORY)
        out.append(GateExample(ex.question, tuple(mems), tuple(blocks.related), tuple(working)))
    return out
