"""The main job, on the trainers: a tiny Qwen2 learns to reconstruct text from its own compressed memory.

``memcomp demo`` runs the ``tiny_cpu`` CPT recipe (``memcomp.trainers``: reconstruction from memory mixed
with plain language modelling, 70 : 30 as in the paper's phase 1, encoder + projection + decoder jointly,
4x compression) on Python standard-library docstrings, then evaluates on held-out passages:
greedy reconstruction from memory (position-wise token accuracy, ROUGE-L) and teacher-forced accuracy,
each against a control where the memory is another passage's. ``memcomp demo --stage sft`` continues
with the SFT recipe on synthetic QA from the same corpus (the passage's first, second or third word) and evaluates
answers from memory against the same control.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import torch

from memcomp.tasks import INSTRUCTIONS, SampleBuilder

PRESETS: dict[str, list[str]] = {
    "tiny": [],  # ~10 minutes on 2 CPU cores
    "smoke": ["optim.steps=6", "optim.samples_per_step=4", "compressor.tiny_hidden=64", "compressor.tiny_layers=2",
              "compressor.tiny_vocab=512", "data.doc_tokens=16", "run.eval_every=0", "run.save_every=0"],
    "small": ["run.device=cuda", "run.dtype=bfloat16", "compressor.tiny_hidden=512", "compressor.tiny_layers=8",
              "compressor.tiny_vocab=8192", "compressor.chunk_size=16", "data.doc_tokens=256", "optim.steps=4000",
              "optim.samples_per_step=32", "optim.lr_full=1e-3", "optim.lr_proj=2e-3"],
    # The real SmolLM2-135M-Instruct (recipe smollm2): one GPU, under 10 minutes (the recipe's time_limit_min).
    "smollm2": [],
}
# Presets of another model size or vocabulary than the default: their runs and data live under runs/demo-<preset>/
# (a smoke run in runs/demo/ would be resumed by the real demo, with the smoke tokenizer).
SEPARATE_PRESETS = ("smoke", "small")
# The RL stage's additions to a preset (the trainer options of the dapo stage only). Smoke: tiny groups and
# dynamic sampling off (a barely trained smoke model answers nothing right, so every group would be dropped).
RL_PRESETS: dict[str, list[str]] = {
    "smoke": ["rl.group_size=4", "rl.prompts_per_step=4", "rl.mini_batch_prompts=2", "rl.gen_prompts=4",
              "rl.max_response_tokens=6",
              "rl.overlong_buffer=2", "rl.dynamic_warmup_steps=6"],
}
STAGES = ("cpt", "sft", "rl", "lychee")
# Where each stage starts: the previous stage's compressor, next to this stage's out_dir.
PREVIOUS_STAGE = {"sft": "cpt", "rl": "sft", "lychee": "cpt"}
# The trainer recipe stage of each demo stage (lychee: the reasoner SFT of memcomp.demo.lychee).
RECIPE_STAGE = {"cpt": "cpt1", "sft": "sft", "rl": "dapo", "lychee": "reasoner"}
DEMO_OPTIONS = {"eval_passages": 64, "eval_questions": 0}  # eval_questions: 0 = every held-out question
# Presets on another recipe than tiny_cpu (memcomp.trainers.recipes), with their overrides in PRESETS.
PRESET_RECIPES = {"smollm2": "smollm2"}
# GPU-only presets refuse a CPU with an estimate: CPU training throughput of the smollm2 recipe (fp32, decoder +
# encoder tokens per second), measured with one thread on a 2-core machine: 44-57 tokens/s over 4 steps.
CPU_TRAIN_TOKENS_PER_S = {"smollm2": 50.0}


def make_config(preset: str = "tiny", stage: str = "cpt", overrides: list[str] | None = None):
    """-> (trainer config, demo options). ``stage``: cpt (recipe stage cpt1), sft, rl (the dapo stage) or lychee
    (the reasoner stage; ``lychee.<name>=`` options are ``memcomp.demo.lychee``'s and are checked and left out
    here), each but cpt continuing from the previous stage's ``compressor/`` beside its ``out_dir`` unless
    ``init_from=`` is given. ``overrides``: key=value for any trainer option (dotted, or its short name where unique:
    ``steps=2000`` is ``optim.steps=2000``) or demo option. Raises ``ValueError`` for an unknown preset, stage or
    key, or a preset whose recipe has no such stage (smollm2 has no rl)."""
    from memcomp.trainers.config import apply_overrides
    from memcomp.trainers.recipes import recipe

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if stage not in STAGES:
        raise ValueError(f"unknown demo stage {stage!r}; choose {', '.join(STAGES)}")
    options = dict(DEMO_OPTIONS)
    if stage == "lychee":
        from memcomp.demo.lychee import lychee_settings

        overrides = lychee_settings(preset, list(overrides or []))[1]
    rest = []
    for item in overrides or []:
        key, _, value = item.partition("=")
        if key in options:
            options[key] = int(value)
        else:
            rest.append(item)
    if preset == "smoke":
        options["eval_passages"], options["eval_questions"] = 4, 6
    cfg = recipe(PRESET_RECIPES.get(preset, "tiny_cpu"), RECIPE_STAGE[stage])
    cfg = apply_overrides(cfg, PRESETS[preset] + (RL_PRESETS.get(preset, []) if stage == "rl" else []) + rest)
    named = any(item.partition("=")[0] in ("out_dir", "run.out_dir") for item in rest)
    if preset in SEPARATE_PRESETS and not named and cfg.run.out_dir.startswith("runs/demo/"):
        # Another model and tokenizer than the default demo's: its own folders, so neither resumes the other's run.
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(
            cfg.run, out_dir=cfg.run.out_dir.replace("runs/demo/", f"runs/demo-{preset}/", 1)))
    if stage in PREVIOUS_STAGE and not cfg.compressor.init_from:
        cfg = dataclasses.replace(cfg, compressor=dataclasses.replace(cfg.compressor, init_from=os.path.join(
            os.path.dirname(cfg.run.out_dir), PREVIOUS_STAGE[stage], "compressor")))
    return cfg, options


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def rouge_l_f1(candidate: list[int], reference: list[int]) -> float:
    """ROUGE-L F1 over token sequences (longest common subsequence)."""
    if not candidate or not reference:
        return 0.0
    prev = [0] * (len(reference) + 1)
    for c in candidate:
        cur = [0]
        for j, r in enumerate(reference):
            cur.append(prev[j] + 1 if c == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def position_accuracy(candidate: list[int], reference: list[int]) -> float:
    """Fraction of reference positions the candidate reproduces exactly (missing tokens count as wrong)."""
    return sum(int(i < len(candidate) and candidate[i] == t) for i, t in enumerate(reference)) / len(reference)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

def _records(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def evaluate_reconstruction(comp, cfg, n: int) -> dict[str, float]:
    """Right memory vs another passage's memory (the control), on held-out passages."""
    tok = comp.tokenizer
    doc_tokens = cfg.data.doc_tokens
    docs = [ids[:doc_tokens] for ids in (tok(r["text"], add_special_tokens=False)["input_ids"]
                                         for r in _records(cfg.data.val_text_file)) if len(ids) >= doc_tokens]
    docs = docs[:n]
    if len(docs) < n:
        raise RuntimeError(f"only {len(docs)} held-out passages of {doc_tokens} tokens; lower eval_passages")
    _, after = SampleBuilder(tok, "flat", chunk_size=comp.config.chunk_size).prompt(INSTRUCTIONS["reconstruction"][0])
    mems = comp.encode_chunks([torch.tensor(d) for d in docs])
    result: dict[str, float] = {}
    for name, mm in (("memory", mems), ("control", mems[1:] + mems[:1])):
        acc, rouge, tf_acc = [], [], []
        for b0 in range(0, len(docs), 16):
            tb, mb = docs[b0:b0 + 16], mm[b0:b0 + 16]
            batch = comp.build_decoder_inputs(mb, [after] * len(tb), padding_side="left")
            gen = comp.model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                      max_new_tokens=doc_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            for g, ref in zip(gen.tolist(), tb):
                acc.append(position_accuracy(g, ref))
                rouge.append(rouge_l_f1(g[: len(ref)], ref))
            tf = comp.build_decoder_inputs(mb, [after] * len(tb), tb, padding_side="right", append_eos=False)
            logits = comp.model(**tf.model_kwargs(), use_cache=False).logits[:, :-1]
            lab = tf.labels[:, 1:]
            sel = lab != -100
            tf_acc.append(float((logits.argmax(-1)[sel] == lab[sel]).float().mean()))
        result[f"{name}_token_accuracy"] = sum(acc) / len(acc)
        result[f"{name}_rouge_l"] = sum(rouge) / len(rouge)
        result[f"{name}_teacher_forced_accuracy"] = sum(tf_acc) / len(tf_acc)
    return result


@torch.no_grad()
def qa_hits(comp, cfg, n: int = 0, encoder=None) -> dict[str, Any]:
    """Per-question results behind ``evaluate_qa``: ``{"records", "passages", "memory", "control"}``, the last two
    lists of bools (the first word of the greedy answer equals the gold answer verbatim), one per held-out
    question (``n`` of them, 0 = all, in file order).

    ``comp`` decodes; ``encoder`` (default ``comp``) encodes the passages into memory. The RL stage passes the SFT
    compressor as ``encoder``: DAPO trains the decoder on memories the SFT encoder made once (its memory bank), and
    encoder and decoder share weights, so re-encoding with the RL weights would evaluate another setting than the
    one trained. The control reads the next passage's memory (never the same passage's). Raises
    ``RuntimeError`` when the questions come from fewer than two passages."""
    tok = comp.tokenizer
    encoder = encoder if encoder is not None else comp
    sb = SampleBuilder(tok, cfg.data.prompt_format, chunk_size=comp.config.chunk_size)
    recs = _records(cfg.data.val_qa_file)
    recs = recs[:n] if n else recs
    contexts = list(dict.fromkeys(r["context"] for r in recs))  # passages in order, once each
    if len(contexts) < 2:
        raise RuntimeError(f"{cfg.data.val_qa_file}: the control needs questions from at least two passages")
    other = {c: contexts[(i + 1) % len(contexts)] for i, c in enumerate(contexts)}
    ids = {c: tok(c, add_special_tokens=False)["input_ids"][: cfg.data.doc_tokens] for c in contexts}
    encoded = dict(zip(contexts, encoder.encode_chunks([torch.tensor(ids[c]) for c in contexts])))
    samples = [sb.qa(ids[r["context"]], r["question"], tok(r["answer"], add_special_tokens=False)["input_ids"])
               for r in recs]
    hits: dict[str, Any] = {"records": recs, "passages": len(contexts)}
    for name, pick in (("memory", lambda c: c), ("control", lambda c: other[c])):
        hits[name] = []
        for b0 in range(0, len(recs), 32):
            batch = recs[b0:b0 + 32]
            out = comp.generate([encoded[pick(r["context"])] for r in batch],
                                [s.after for s in samples[b0:b0 + 32]],
                                prefixes=[s.before for s in samples[b0:b0 + 32]], max_new_tokens=6)
            hits[name] += [answer_word(o) == r["answer"] for o, r in zip(out, batch)]
    return hits


def answer_word(text: str) -> str:
    """The first whitespace-separated word of a generated answer, cut where ChatML's end marker begins
    (``memcomp.rl.rollout.strip_end_marker``, the DAPO reward's rule). The tiny tokenizer spells the marker as 7
    text tokens and the model writes it right after the word, so the 6-token answer budget often ends inside it:
    "Decode<|im" is the answer "Decode"."""
    from memcomp.rl.rollout import strip_end_marker

    words = strip_end_marker(text).split()
    return words[0] if words else ""


def _qa_metrics(hits: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"questions": len(hits["records"]), "passages": hits["passages"]}
    for name in ("memory", "control"):
        h = hits[name]
        k = sum(h)
        result[f"{name}_answer_accuracy"] = k / len(h)
        result[f"{name}_answer_accuracy_ci95"] = wilson_interval(k, len(h))
    diff = [int(a) - int(b) for a, b in zip(hits["memory"], hits["control"])]
    result["answer_accuracy_difference"] = sum(diff) / len(diff)
    result["answer_accuracy_difference_ci95"] = mean_interval(diff)
    return result


def evaluate_qa(comp, cfg, n: int = 0, encoder=None) -> dict[str, Any]:
    """Held-out synthetic QA (``n`` questions, 0 = all): the exact answer from the right memory vs from another
    passage's memory (the control: the next passage's, never the same passage's), on the same questions with
    the same greedy decoding. Reports both accuracies with Wilson 95 % intervals and the paired difference
    with its 95 % interval (normal approximation over per-question differences). ``encoder``: see ``qa_hits``."""
    return _qa_metrics(qa_hits(comp, cfg, n, encoder))


def compare_qa(sft, rl, cfg, n: int = 0) -> dict[str, Any]:
    """The RL demo's verdict: held-out answer accuracy of the RL decoder against the SFT decoder it started from,
    on the same ``n`` questions (0 = all), the same memories (encoded once by ``sft``) and the same greedy
    decoding. -> ``{"sft": evaluate_qa metrics, "rl": ..., "rl_minus_sft", "rl_minus_sft_ci95",
    "rl_minus_sft_se", "rl_minus_sft_z"}``: the paired per-question difference of the right-memory hits (mean,
    95 % interval, standard error, mean / standard error; a z of 0 when every question agrees). Raises
    ``RuntimeError`` as ``qa_hits``."""
    before = qa_hits(sft, cfg, n)
    after = qa_hits(rl, cfg, n, encoder=sft)
    diff = [int(a) - int(b) for a, b in zip(after["memory"], before["memory"])]
    mean = sum(diff) / len(diff)
    lo, hi = mean_interval(diff)
    se = (hi - lo) / (2 * 1.96)
    return {"sft": _qa_metrics(before), "rl": _qa_metrics(after), "rl_minus_sft": mean,
            "rl_minus_sft_ci95": (lo, hi), "rl_minus_sft_se": se, "rl_minus_sft_z": mean / se if se > 0 else 0.0,
            "questions_changed": {"wrong_to_right": diff.count(1), "right_to_wrong": diff.count(-1)}}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95 % at z = 1.96)."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Mean +- z standard errors (sample standard deviation; 95 % at z = 1.96)."""
    n = len(values)
    if n < 2:
        raise ValueError("mean_interval needs at least two values")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return (mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n))


def plot_history(history: list[dict[str, Any]], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    tasks = sorted({t for r in history for t in r.get("task_loss", {})})
    names = {"lm": "plain LM", "reconstruction": "reconstruction from memory", "continuation": "continuation",
             "qa": "QA from memory"}
    for t in tasks:
        pts = [(r["step"], r["task_loss"][t]) for r in history if t in r.get("task_loss", {})]
        xs, ys = zip(*pts)
        k = max(1, len(ys) // 50)
        smooth = [sum(ys[max(0, i - k):i + 1]) / len(ys[max(0, i - k):i + 1]) for i in range(len(ys))]
        line, = ax.plot(xs, smooth, label=f"{names.get(t, t)} (mean of last {k + 1} steps)")
        ax.plot(xs, ys, alpha=0.15, color=line.get_color())
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "k--o", ms=3, label="held-out loss (mixture)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per target token")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------

def cpu_refusal(preset: str, cfg) -> str | None:
    """Why a GPU-only preset will not run here (a CPU device, or device=cuda without CUDA), with the time it would
    take on a CPU; None where it runs (any preset on a GPU, the CPU presets anywhere)."""
    from memcomp.trainers.build import resolve_device

    if preset not in CPU_TRAIN_TOKENS_PER_S or (resolve_device(cfg.run.device).startswith("cuda")
                                                and torch.cuda.is_available()):
        return None
    # Tokens per sample through encoder + decoder: a reconstruction sample holds the passage (encoder), 3 decoder
    # positions per chunk, ~8 of instruction and the passage again as target; a plain LM sample the passage.
    doc, chunks = cfg.data.doc_tokens, math.ceil(cfg.data.doc_tokens / cfg.compressor.chunk_size)
    per_sample = 0.7 * (2 * doc + 3 * chunks + 9) + 0.3 * doc
    steps, samples = cfg.optim.steps, cfg.optim.samples_per_step
    seconds = steps * samples * per_sample / CPU_TRAIN_TOKENS_PER_S[preset]
    return (f"the {preset} preset trains a real 135M-parameter model and needs a GPU (under 10 minutes on one "
            f"H100/H200); on a CPU its {steps} steps of {samples} samples (~{per_sample:.0f} "
            f"tokens each) would take about {seconds / 3600:.0f} hours at the ~{CPU_TRAIN_TOKENS_PER_S[preset]:.0f} "
            "tokens/s measured on 2 cores. Run it with device=cuda on a GPU machine; `memcomp demo` (the tiny "
            "preset) is the CPU demo")


def plot_rl_history(history: list[dict[str, Any]], path: str) -> bool:
    """Reward mean and sampled accuracy on the train questions, per DAPO step; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not history:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["accuracy"] for r in history], "o-", ms=3, label="train questions: accuracy of the rollouts")
    ax.plot(steps, [r["reward_mean"] for r in history], alpha=0.6, label="reward mean (after overlong shaping)")
    ax.plot(steps, [r["kept_fraction"] for r in history], ":", label="kept-group fraction (dynamic sampling)")
    ax.set_xlabel("DAPO step")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("memcomp demo (rl): DAPO on answers from memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_rl(preset: str = "tiny", overrides: list[str] | None = None) -> dict[str, Any]:
    """The RL stage: the recipe's dapo stage (``memcomp.trainers.dapo``) from the SFT demo's compressor on the
    train split's questions, then held-out answer accuracy after RL against after SFT (``compare_qa``: same
    questions, same memories, same greedy decoding), each against the wrong-memory control. Writes
    ``summary.json`` and ``reward.png`` to the run's ``out_dir``. Raises ``FileNotFoundError`` without the SFT
    compressor, ``RuntimeError`` when the held-out memories would come from another encoder than the train ones."""
    from memcomp.trainers.build import build_compressor
    from memcomp.trainers.dapo import train as dapo_train
    from memcomp.trainers.recipes import prepare

    t0 = time.time()
    cfg, options = make_config(preset, "rl", overrides)
    if not os.path.isdir(cfg.compressor.init_from):
        raise FileNotFoundError(f"the RL stage continues from the SFT demo: {cfg.compressor.init_from} not found; "
                                "run `memcomp demo --stage sft` first (or pass init_from=...)")
    result = dapo_train(cfg)
    cfg = prepare(cfg)
    rl = result.pop("compressor")
    rl.eval()
    # The SFT compressor as DAPO started from it: the decoder to compare against and the encoder of every memory.
    sft = build_compressor(cfg.compressor, cfg.fqlora, device=str(rl.device), dtype=cfg.run.dtype, seed=cfg.run.seed)
    sft.eval()
    if sft.fingerprint() != result["bank"].fingerprint:
        raise RuntimeError(f"{cfg.compressor.init_from} no longer encodes as the RL run's memory bank "
                           f"({sft.fingerprint()} vs {result['bank'].fingerprint}): it changed after the RL run")
    history = result["history"]
    t_eval = time.time()
    metrics = compare_qa(sft, rl, cfg, options["eval_questions"])
    last = history[-min(5, len(history)):]
    mean = lambda key, rows: sum(r[key] for r in rows) / len(rows) if rows else float("nan")  # noqa: E731
    summary = {
        "stage": "rl", "preset": preset, "config": result["config"],
        "parameters": sum(p.numel() for p in rl.parameters()), "compression": f"{rl.config.chunk_size}x",
        "eval": metrics,
        # The acceptance: after RL above after SFT by more than two standard errors of the paired difference.
        "rl_above_sft": metrics["rl_minus_sft_z"] > 2.0,
        "train_reward_first": mean("reward_mean", history[:5]), "train_reward_last": mean("reward_mean", last),
        "train_accuracy_first": mean("accuracy", history[:5]), "train_accuracy_last": mean("accuracy", last),
        "kept_fraction_mean": mean("kept_fraction", history),
        "history": [{k: r[k] for k in ("step", "loss", "reward_mean", "accuracy", "kept_fraction", "gen_batches",
                                       "response_length", "clip_fraction", "rollout_seconds", "update_seconds")}
                    for r in history],
        "train_seconds": result["train_seconds"], "steps_trained_now": result["steps_this_run"],
        "eval_seconds": time.time() - t_eval, "invocation_seconds": time.time() - t0,
    }
    with open(os.path.join(cfg.run.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_rl_history(history, os.path.join(cfg.run.out_dir, "reward.png"))
    summary["out_dir"] = cfg.run.out_dir
    return summary


def run(preset: str = "tiny", stage: str = "cpt", overrides: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate one demo preset; raises ``RuntimeError`` for a GPU-only preset on a CPU."""
    from memcomp.trainers.loop import train
    from memcomp.trainers.recipes import prepare

    if stage == "rl":
        return run_rl(preset, overrides)
    if stage == "lychee":
        from memcomp.demo.lychee import run_lychee

        return run_lychee(preset, overrides)
    t0 = time.time()
    cfg, options = make_config(preset, stage, overrides)
    refusal = cpu_refusal(preset, cfg)
    if refusal:
        raise RuntimeError(refusal)
    result = train(cfg)
    cfg = prepare(cfg)
    comp = result.pop("compressor")
    comp.eval()
    history = result["history"]
    t_eval = time.time()
    if stage == "cpt":
        metrics = evaluate_reconstruction(comp, cfg, options["eval_passages"])
        ratios = {"greedy": metrics["memory_token_accuracy"] / max(metrics["control_token_accuracy"], 1e-9),
                  "teacher_forced": metrics["memory_teacher_forced_accuracy"]
                  / max(metrics["control_teacher_forced_accuracy"], 1e-9)}
        carries = ratios["greedy"] >= 2.0 and ratios["teacher_forced"] >= 2.0
    else:
        metrics = evaluate_qa(comp, cfg, options["eval_questions"])
        ratios = {"answer": metrics["memory_answer_accuracy"] / max(metrics["control_answer_accuracy"], 1e-9)}
        # Right memory above the control with 95 % confidence (the paired difference's interval excludes 0).
        carries = metrics["answer_accuracy_difference_ci95"][0] > 0
    last = history[-min(20, len(history)):]
    task_last = {t: sum(r["task_loss"][t] for r in last if t in r["task_loss"])
                 / max(1, sum(t in r["task_loss"] for r in last))
                 for t in {t for r in last for t in r["task_loss"]}}
    summary = {
        "stage": stage, "preset": preset, "config": result["config"],
        "parameters": sum(p.numel() for p in comp.parameters()),
        "compression": f"{comp.config.chunk_size}x", "final_loss": sum(r["loss"] for r in last) / len(last),
        "final_task_loss": task_last, "losses": [r["loss"] for r in history], "eval": metrics,
        "memory_vs_control_ratios": ratios, "memory_carries_information": carries,
        "stopped_early": result["stopped_early"], "stopped_by_time_limit": result["stopped_by_time_limit"],
        # Training time over every invocation of this run (a resumed or finished run keeps its earlier time);
        # this invocation's own time and its evaluation, apart.
        "train_seconds": result["train_seconds"], "steps_trained_now": result["steps_this_run"],
        "eval_seconds": time.time() - t_eval, "invocation_seconds": time.time() - t0,
    }
    with open(os.path.join(cfg.run.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_history(history, os.path.join(cfg.run.out_dir, "loss.png"),
                 f"memcomp demo ({stage}): learning to read text from memory")
    summary["out_dir"] = cfg.run.out_dir
    return summary
