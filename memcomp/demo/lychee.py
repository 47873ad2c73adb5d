"""``memcomp demo --stage lychee``: LycheeMemory on the tiny model, against MemAgent and full context.

From the CPT demo's compressor (``runs/demo/cpt/compressor``), on the synthetic task of ``memcomp.eval.synthetic``
(invented people and cities hidden among standard-library docstrings, with confusers):

1. **Reasoner SFT** (``memcomp.trainers.sft``, recipe ``tiny_cpu`` stage ``reasoner``): the ideal traces of
   ``memcomp.lychee.traces`` -- every call the systems make (LycheeMemory update over a compressed block, MemAgent
   update over a raw chunk, final answer, full-context answer) as one supervised record, one model for all four;
2. **Gate** (``memcomp.lychee.gate.train_gate``) on the reasoner's weights (one backbone: the gate is a LoRA and a
   head on it), threshold set on validation for recall 0.95;
3. **Evaluation** (``memcomp.lychee.harness.run_eval``) on held-out questions (held-out distractor text, other
   invented names): LycheeMemory, LycheeMemory without its gate, MemAgent and full context on the same questions,
   greedy, with accuracy (sub-EM, Wilson 95 % interval) and cost per question.

Settings (``LycheeDemoSettings``, overridable as ``lychee.<name>=value``): 512-token contexts, blocks and MemAgent
chunks of 64 tokens (16 memory embeddings per block at the demo's 4x), one hop. Outputs under
``runs/demo/lychee/``: the reasoner's run (``compressor/``, ``metrics.jsonl``, checkpoints), ``gate/``,
``stores/`` (the held-out block stores), ``eval.{json,md,png}`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

__all__ = ["LycheeDemoSettings", "lychee_settings", "prepare_reasoner_data", "call_accuracy", "run_lychee"]


@dataclasses.dataclass(frozen=True)
class LycheeDemoSettings:
    """The lychee stage's task and evaluation (the trainer options are the recipe's ``reasoner`` stage).

    context_tokens:   length of each synthetic context in tokens (``SyntheticConfig.target_tokens``).
    block_tokens:     LycheeMemory's block size B (a multiple of the compressor's chunk size).
    chunk_tokens:     MemAgent's raw chunk size.
    hops, num_confusers:  the synthetic task's difficulty (``SyntheticConfig``).
    train_examples:   synthetic examples turned into reasoner SFT records (train distractors, seed 1).
    val_examples:     examples of the validation records (held-out distractors, seed 3).
    gate_examples:    examples the gate trains and sets its threshold on (train distractors, seed 2).
    eval_questions:   held-out questions every system answers (held-out distractors, seed 0: ``memcomp eval``'s).
    memory_tokens, answer_tokens:  the working-memory cap and the answer's limit (greedy decoding).
    batch_size:       questions per engine call.
    gate_epochs:      the gate's epochs (more overfit its validation loss on the tiny model).
    """

    context_tokens: int = 512
    block_tokens: int = 64
    chunk_tokens: int = 64
    hops: int = 1
    num_confusers: int = 2
    train_examples: int = 1200
    val_examples: int = 24
    gate_examples: int = 160
    eval_questions: int = 128
    memory_tokens: int = 40
    answer_tokens: int = 16
    batch_size: int = 16
    gate_epochs: int = 2

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if f.name == "num_confusers" else 1):
                raise ValueError(f"lychee.{f.name} must be an int >= {0 if f.name == 'num_confusers' else 1}, "
                                 f"got {v!r}")
        if self.hops not in (1, 2):
            raise ValueError(f"lychee.hops must be 1 or 2, got {self.hops}")


# The smoke preset: a pipeline check in seconds (a few examples, short contexts).
SMOKE = {"context_tokens": 96, "block_tokens": 32, "chunk_tokens": 32, "train_examples": 6, "val_examples": 2,
         "gate_examples": 4, "eval_questions": 3, "memory_tokens": 8, "answer_tokens": 6, "batch_size": 4,
         "gate_epochs": 1}


def lychee_settings(preset: str, overrides: list[str]) -> tuple[LycheeDemoSettings, list[str]]:
    """(the stage's settings, the overrides left for the trainer). ``lychee.<name>=<int>`` sets a setting; raises
    ``ValueError`` for an unknown name or a value that is not an int."""
    values = dict(SMOKE) if preset == "smoke" else {}
    names = {f.name for f in dataclasses.fields(LycheeDemoSettings)}
    rest = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not key.startswith("lychee."):
            rest.append(item)
            continue
        name = key[len("lychee."):]
        if name not in names or not sep:
            raise ValueError(f"unknown lychee option {item!r}; choose from "
                             f"{', '.join('lychee.' + n for n in sorted(names))}")
        try:
            values[name] = int(value)
        except ValueError:
            raise ValueError(f"{key} must be an int, got {value!r}") from None
    return LycheeDemoSettings(**values), rest


def _examples(settings: LycheeDemoSettings, split: str, count: int, seed: int, tokenizer: Any) -> list[Any]:
    from memcomp.demo.corpus import stdlib_passages
    from memcomp.eval.synthetic import SyntheticConfig, generate_dataset

    cfg = SyntheticConfig(hops=settings.hops, num_distractors=0, target_tokens=settings.context_tokens,
                          num_confusers=settings.num_confusers)
    return generate_dataset(stdlib_passages()[split], count, cfg, seed=seed, tokenizer=tokenizer)


def prepare_reasoner_data(cfg: Any, settings: Optional[LycheeDemoSettings] = None) -> Any:
    """Write the reasoner SFT records (train and validation) beside the demo data once for these settings and
    tokenizer, and return ``cfg`` with ``data.trace_file`` / ``data.val_trace_file`` pointing at them (files the
    caller named are kept). ``cfg``: the reasoner stage's trainer config after ``prepare_demo_data``."""
    from transformers import AutoTokenizer

    from memcomp.demo.data import demo_data_dir, write_jsonl
    from memcomp.lychee.traces import TraceConfig, trace_records

    settings = settings if settings is not None else LycheeDemoSettings()
    d = cfg.data
    if d.trace_file and d.val_trace_file:
        return cfg
    from memcomp.lychee.store import tokenizer_digest

    # The records hold token ids: they must come from the tokenizer of the compressor that trains on them (the one
    # init_from names when given), and a file written under another vocabulary is never reused (the digest).
    c = cfg.compressor
    if c.init_from:
        tokenizer = AutoTokenizer.from_pretrained(c.init_from)
    elif c.tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(c.tokenizer_dir)
    else:
        from memcomp.models import load_pretrained

        tokenizer = load_pretrained(c.model_dir)[1]
    key = (f"h{settings.hops}-x{settings.num_confusers}-L{settings.context_tokens}-b{settings.block_tokens}"
           f"-c{settings.chunk_tokens}-t{tokenizer_digest(tokenizer)}")
    folder = os.path.join(demo_data_dir(cfg.run.out_dir), "lychee")
    paths = {"train": os.path.join(folder, f"traces-{key}-n{settings.train_examples}.jsonl"),
             "val": os.path.join(folder, f"traces-{key}-val{settings.val_examples}.jsonl")}
    if not all(os.path.isfile(p) for p in paths.values()):
        os.makedirs(folder, exist_ok=True)
        trace_cfg = TraceConfig(block_tokens=settings.block_tokens, chunk_tokens=settings.chunk_tokens)
        for split, distractors, count, seed in (("train", "train", settings.train_examples, 1),
                                                ("val", "heldout", settings.val_examples, 3)):
            examples = _examples(settings, distractors, count, seed, tokenizer)
            write_jsonl(paths[split], trace_records(examples, tokenizer, trace_cfg, seed=seed))
    return dataclasses.replace(cfg, data=dataclasses.replace(d, trace_file=d.trace_file or paths["train"],
                                                             val_trace_file=d.val_trace_file or paths["val"]))


# The settings the reasoner is trained with (the records); the others (gate, evaluation) are redone on every run.
TRAINING_SETTINGS = ("context_tokens", "block_tokens", "chunk_tokens", "hops", "num_confusers", "train_examples",
                     "val_examples")


def _check_same_settings(out_dir: str, settings: LycheeDemoSettings) -> None:
    """A lychee run folder belongs to one reasoner: rerunning it with other training settings
    (``TRAINING_SETTINGS``) would resume the old reasoner and report it under the new settings. Records the settings
    on the first run; raises ``ValueError`` naming the differences on a later one. Gate and evaluation settings may
    change (they are redone on every run)."""
    from memcomp.trainers.checkpoint import atomic_write

    path = os.path.join(out_dir, "lychee_settings.json")
    mine = dataclasses.asdict(settings)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            theirs = json.load(f)
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if k in TRAINING_SETTINGS and theirs.get(k) != v}
        if diff:
            shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{out_dir} holds a lychee run with other settings ({shown}); pass out_dir=<new folder> "
                             "to run with these (nothing was changed)")
        return
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(path, json.dumps(mine, indent=2))


def call_accuracy(comp: Any, path: str, *, max_new_tokens: int, batch_size: int = 16) -> dict[str, Any]:
    """Each call of the loop alone, from the ideal inputs: greedy output against the record's target for every
    validation trace record (exact match after stripping; an update is split into "evidence" steps, where the
    memory changes, and "keep" steps, where it must be copied unchanged). This separates what the reasoner learned
    per call from the end-to-end accuracy, where one wrong step loses the answer. Returns per category
    ``{"n", "exact", "ci95"}``."""
    from memcomp.eval.scoring import accuracy_interval
    from memcomp.lychee.prompts import Prompts
    from memcomp.lychee.traces import trace_sample, turn_end_ids
    from memcomp.rl.engine import GenerationRequest, HFEngine, SamplingOptions

    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    prompts, end = Prompts(comp.tokenizer), turn_end_ids(comp.tokenizer)
    engine = HFEngine(comp, max_batch_size=batch_size)
    options = SamplingOptions(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, stop_token_ids=tuple(end))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        name = r["kind"]
        if name.endswith("_update"):
            name += " (evidence)" if r["target"] != r["memory"] else " (keep)"
        groups.setdefault(name, []).append(r)
    out = {}
    for name, recs in sorted(groups.items()):
        samples = [trace_sample(r, prompts, end) for r in recs]
        requests = [GenerationRequest(comp.encode(s.context) if s.context else None, s.after, s.before or None)
                    for s in samples]
        results = engine.generate(requests, options)
        hits = [float(res[0].text.strip() == r["target"].strip()) for res, r in zip(results, recs)]
        acc, lo, hi = accuracy_interval(hits)
        out[name] = {"n": len(hits), "exact": acc, "ci95": [lo, hi]}
    return out


def run_lychee(preset: str = "tiny", overrides: Optional[list[str]] = None, *,
               progress: Optional[bool] = None) -> dict[str, Any]:
    """The lychee stage (module docstring): reasoner SFT, gate, evaluation of the four systems. Returns the summary
    (also written to ``runs/demo/lychee/summary.json``). Raises ``FileNotFoundError`` without the CPT demo's
    compressor, ``ValueError`` for a bad option."""
    import torch

    from memcomp.compressor import MemoryCompressor
    from memcomp.demo.data import prepare_demo_data
    from memcomp.demo.run import make_config
    from memcomp.lychee.gate import GateConfig, GateTrainConfig, evaluate_gate, gate_examples_from_synthetic, train_gate
    from memcomp.lychee.harness import HarnessConfig, format_table, load_items, ratios, run_eval, write_report
    from memcomp.lychee.reasoner import GenerationSettings
    from memcomp.rl.engine import HFEngine
    from memcomp.trainers.loop import train

    t0 = time.time()
    settings, rest = lychee_settings(preset, list(overrides or []))
    cfg, _ = make_config(preset, "lychee", rest)
    if not os.path.isdir(cfg.compressor.init_from):
        raise FileNotFoundError(f"the lychee stage continues from the CPT demo: {cfg.compressor.init_from} not found; "
                                "run `memcomp demo` first (or pass init_from=...)")
    # The records for these settings, named in the config before the trainer's own preparation (which keeps files
    # already named, so it cannot write default-settings records in their place).
    cfg = prepare_reasoner_data(prepare_demo_data(cfg), settings)
    _check_same_settings(cfg.run.out_dir, settings)
    result = train(cfg)
    comp: MemoryCompressor = result.pop("compressor")
    comp.eval()
    root = cfg.run.out_dir

    # The gate, on the reasoner's weights (the backbone it scores with is the one that reasons).
    t_gate = time.time()
    gate_dir = os.path.join(root, "gate")
    from tqdm.auto import tqdm

    examples = _examples(settings, "train", settings.gate_examples, 2, comp.tokenizer)
    gate_data = [g for ex in tqdm(examples, desc="gate: encoding blocks", unit="question", disable=progress is False)
                 for g in gate_examples_from_synthetic(comp, [ex], settings.block_tokens)]
    gate_cfg = GateConfig(question_tokens=64, memory_tokens=settings.memory_tokens)
    gate_result = train_gate(comp, gate_data, config=gate_cfg,
                             train=GateTrainConfig(epochs=settings.gate_epochs, seed=cfg.run.seed),
                             out_dir=gate_dir, progress=progress)
    gate = gate_result.gate
    gate_seconds = time.time() - t_gate

    # Held-out questions: memcomp eval's synthetic task (held-out distractors, seed 0).
    items = load_items("synthetic", comp.tokenizer, [settings.context_tokens], num_questions=settings.eval_questions,
                       hops=settings.hops, seed=0)
    heldout_gate = evaluate_gate(gate, gate_examples_from_synthetic(
        comp, _examples(settings, "heldout", min(settings.eval_questions, 64), 0, comp.tokenizer),
        settings.block_tokens))
    generation = GenerationSettings(memory_tokens=settings.memory_tokens, answer_tokens=settings.answer_tokens,
                                    question_tokens=64, temperature=0.0, top_p=1.0)
    harness = HarnessConfig(generation=generation, block_tokens=settings.block_tokens,
                            chunk_tokens=settings.chunk_tokens, batch_size=settings.batch_size,
                            store_dir=os.path.join(root, "stores"))
    t_eval = time.time()
    with torch.inference_mode():
        calls = call_accuracy(comp, cfg.data.val_trace_file, max_new_tokens=settings.memory_tokens,
                              batch_size=settings.batch_size)
        report = run_eval(comp, HFEngine(comp), items, harness, gate=gate, progress=progress, task="synthetic")
    eval_seconds = time.time() - t_eval
    report["demo"] = {"settings": dataclasses.asdict(settings), "gate_heldout": {
        m: dataclasses.asdict(v) for m, v in heldout_gate.items()}}
    paths = write_report(report, root, name="eval")
    summary = {
        "stage": "lychee", "preset": preset, "config": result["config"], "settings": dataclasses.asdict(settings),
        "parameters": sum(p.numel() for p in comp.parameters()), "compression": f"{comp.config.chunk_size}x",
        "reasoner_final_loss": (sum(r["loss"] for r in result["history"][-20:])
                                / max(1, len(result["history"][-20:]))) if result["history"] else None,
        "reasoner_val_loss": [r["val_loss"] for r in result["history"] if "val_loss" in r],
        "gate": {"val_loss_before": gate_result.val_loss_before, "val_loss_after": gate_result.val_loss_after,
                 "thresholds": dict(gate.thresholds),
                 "validation": {m: dataclasses.asdict(v) for m, v in gate_result.metrics.items()},
                 "heldout": {m: dataclasses.asdict(v) for m, v in heldout_gate.items()}},
        "calls": calls, "rows": report["rows"], "ratios_vs_memagent": ratios(report), "table": format_table(report),
        "train_seconds": result["train_seconds"], "gate_seconds": gate_seconds, "eval_seconds": eval_seconds,
        "invocation_seconds": time.time() - t0, "out_dir": root, "report": paths,
    }
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "report"}, f, indent=2, default=str)
    return summary
