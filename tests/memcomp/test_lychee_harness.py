"""memcomp.lychee.harness: every system on the same questions and settings, the per-(system, length) report (sub-EM
and its Wilson interval, cost, blocks read), full context skipped where it does not fit, block stores built once
and reused, the written JSON / Markdown / plot, and the errors raised before any work."""

import json
import os
import re

import pytest
from lychee_testutil import DISTRACTORS, ScriptedEngine

from memcomp.eval.ruler_hqa import HotpotQAFormatError
from memcomp.eval.scoring import accuracy_interval
from memcomp.lychee.gate import Gate
from memcomp.lychee.harness import (
    EvalItem,
    HarnessConfig,
    format_table,
    load_items,
    ratios,
    run_eval,
    write_report,
)
from memcomp.lychee.reasoner import GenerationSettings
from memcomp.memory import MemoryMismatchError

SETTINGS = GenerationSettings(memory_tokens=8, answer_tokens=32, temperature=0, top_p=1.0)
_PROBLEM = re.compile(r"<problem>\n(.*?)\n</problem>", re.DOTALL)


@pytest.fixture
def distractor_file(tmp_path):
    path = tmp_path / "distractors.txt"
    path.write_text("\n\n".join(DISTRACTORS))
    return str(path)


def oracle_respond(answers, right):
    """Updates write "noted"; a final or full-context prompt answers the gold answer for the questions in ``right``
    and a wrong name for the others: the expected accuracy is known exactly."""

    def respond(request, text, options):
        if "Updated memory:" in text:
            return "noted"
        found = _PROBLEM.findall(text)
        question = found[-1] if found else next(q for q in answers if q in text)
        return f"\\boxed{{{answers[question] if question in right else 'Nowhere'}}}"

    return respond


def untrained_gate(comp, sequential):
    """A real gate before training scores every block 0.5: a threshold above that skips every block, one at it
    reads every block."""
    gate = Gate(comp)
    gate.thresholds = {"prefilter": 0.5, "sequential": sequential}
    return gate


def test_all_systems_same_questions_report_and_full_context_skip(make_compressor, distractor_file, tmp_path):
    comp = make_compressor()
    items = load_items("synthetic", comp.tokenizer, [48, 400], data=distractor_file, num_questions=3, hops=1)
    assert [it.length for it in items] == [48] * 3 + [400] * 3
    answers = {it.question: it.answers[0] for it in items}
    right = {items[0].question, items[2].question}  # 2 of 3 at each length (the same questions at both lengths)
    engine = ScriptedEngine(comp.tokenizer, oracle_respond(answers, right))
    cfg = HarnessConfig(generation=SETTINGS, block_tokens=32, chunk_tokens=48, store_dir=str(tmp_path / "stores"))
    report = run_eval(comp, engine, items, cfg, gate=untrained_gate(comp, sequential=0.6), progress=False,
                      task="synthetic")

    rows = {(r["system"], r["length"]): r for r in report["rows"]}
    assert list(rows) == [(s, n) for s in ("lychee", "lychee-nogate", "memagent", "full") for n in (48, 400)]
    # Full context fits 48-token contexts in the tiny model's 512 positions, not 400-token ones: skipped, with why.
    assert rows["full", 400]["skipped"].startswith("does not fit") and "512" in rows["full", 400]["skipped"]
    expected = accuracy_interval([1, 0, 1])
    for key, r in rows.items():
        if key == ("full", 400):
            continue
        assert r["num_questions"] == 3 and r["skipped"] is None
        assert r["accuracy"] == pytest.approx(expected[0]) and r["ci95"] == pytest.approx(list(expected[1:]))
        assert r["seconds_per_question"] > 0 and r["positions_prefilled"] > 0 and r["tokens_generated"] > 0
    # Every system got every question, with the same generation limits.
    asked = {}
    for _, opts in engine.calls:
        assert opts.temperature == 0 and opts.max_new_tokens in (8, 32)
    for q in report["questions"]:
        asked.setdefault((q["system"], q["length"]), set()).add(q["question"])
    assert all(v == {it.question for it in items if it.length == k[1]} for k, v in asked.items())
    # The gate's threshold (0.6) is above every untrained score (0.5): LycheeMemory reads nothing but pays the gate;
    # without the gate every block is read. MemAgent reads ceil(tokens / 48) chunks.
    for n in (48, 400):
        gated, nogate, agent = rows["lychee", n], rows["lychee-nogate", n], rows["memagent", n]
        assert gated["blocks_read"] == 0 and gated["gate_positions"] > 0 and gated["blocks_total"] > 1
        assert nogate["blocks_read"] == nogate["blocks_total"] == gated["blocks_total"]
        assert nogate["gate_positions"] == 0 and agent["blocks_read"] == agent["blocks_total"] >= 1
        assert gated["tokens_generated"] < nogate["tokens_generated"]
    # The stores were built for lychee's rows and shared by lychee-nogate (the same per-length encode figure).
    assert rows["lychee", 400]["encode_seconds"] == rows["lychee-nogate", 400]["encode_seconds"] > 0
    assert rows["lychee", 400]["stores_reused"] == 0
    assert len(os.listdir(tmp_path / "stores")) == 6
    assert rows["lychee", 400]["blocks_total"] > rows["lychee", 48]["blocks_total"]

    # Outputs: JSON round trip, a Markdown line per row, ratios per length where both ran.
    paths = write_report(report, tmp_path / "out")
    back = json.loads(open(paths["json"]).read())
    assert back["rows"] == json.loads(json.dumps(report["rows"])) and back["metadata"]["torch"]
    md = open(paths["markdown"]).read()
    assert md.count("\n| lychee |") == 2 and md.count("\n| full |") == 2 and "skipped: does not fit" in md
    assert md == format_table(report) + "\n"
    r = ratios(report)
    assert [x["length"] for x in r] == [48, 400]
    assert r[0]["speedup"] == pytest.approx(rows["memagent", 48]["seconds_per_question"]
                                            / rows["lychee", 48]["seconds_per_question"])

    # A second run with the same store folder opens the stores: nothing is encoded.
    calls = []
    real = comp.encode_chunks
    comp.encode_chunks = lambda *a, **k: calls.append(1) or real(*a, **k)
    again = run_eval(comp, engine, items, HarnessConfig(systems=("lychee-nogate",), generation=SETTINGS,
                                                        block_tokens=32, store_dir=str(tmp_path / "stores")),
                     progress=False)
    assert calls == [] and [r["stores_reused"] for r in again["rows"]] == [3, 3]


def test_errors_before_any_work(make_compressor, tmp_path):
    comp = make_compressor()
    item = EvalItem("q0", "Where?", ("Here",), "Some text. " * 20, 50)
    engine = ScriptedEngine(comp.tokenizer, lambda r, t, o: "\\boxed{x}")
    stores = tmp_path / "stores"
    long_q = EvalItem("long", "why " * 40, ("x",), "Some text. " * 20, 50)
    short = GenerationSettings(memory_tokens=8, answer_tokens=8, question_tokens=16, temperature=0, top_p=1.0)
    with pytest.raises(ValueError, match=r"long is \d+ tokens, longer than its budget of 16"):
        run_eval(comp, engine, [item, long_q], HarnessConfig(generation=short, block_tokens=32,
                                                             store_dir=str(stores)), progress=False)
    with pytest.raises(ValueError, match="needs a trained gate"):
        run_eval(comp, engine, [item], HarnessConfig(generation=SETTINGS, block_tokens=32, store_dir=str(stores)))
    other = make_compressor(seed=1)
    with pytest.raises(MemoryMismatchError):
        run_eval(comp, engine, [item], HarnessConfig(generation=SETTINGS, block_tokens=32, store_dir=str(stores)),
                 gate=untrained_gate(other, 0.5))
    with pytest.raises(ValueError, match="multiple of the compressor's chunk size 4"):
        run_eval(comp, engine, [item], HarnessConfig(systems=("lychee-nogate",), generation=SETTINGS,
                                                     block_tokens=30, store_dir=str(stores)))
    assert not stores.exists() and engine.calls == []  # nothing encoded, nothing generated
    with pytest.raises(ValueError, match="repeated"):
        run_eval(comp, engine, [item, item], HarnessConfig(systems=("memagent",)))
    with pytest.raises(ValueError, match="unknown system"):
        HarnessConfig(systems=("lychee", "rag"))
    with pytest.raises(ValueError, match="empty question"):
        EvalItem("e", "  ", ("x",), "text", 1)


def test_load_items_tasks_and_bad_data(make_compressor, tmp_path):
    tok = make_compressor().tokenizer
    with pytest.raises(ValueError, match="needs its data"):
        load_items("ruler-hqa", tok, [4])
    with pytest.raises(ValueError, match="unknown task"):
        load_items("squad", tok, [4])
    records = [{"_id": f"q{i}", "question": f"Who is {t}?", "answer": t, "type": "bridge",
                "context": [[f"{t}{k}", [f"{t}{k} is a name."]] for k in range(2)],
                "supporting_facts": [[f"{t}0", 0]]} for i, t in enumerate(["Ann", "Bob", "Cid"])]
    good = tmp_path / "hotpot.json"
    good.write_text(json.dumps(records))
    items = load_items("ruler-hqa", tok, [3, 6], data=str(good), num_questions=2)
    assert [(it.id, it.length) for it in items] == [("hqa-3-0", 3), ("hqa-3-1", 3), ("hqa-6-0", 6), ("hqa-6-1", 6)]
    assert items[0].answers == ("Ann",) and items[2].context.count("Document ") == 6
    broken = [dict(records[0]), dict(records[1])]
    del broken[1]["answer"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    with pytest.raises(HotpotQAFormatError, match=r"record 1 \(_id 'q1'\).*answer"):
        load_items("ruler-hqa", tok, [3], data=str(bad))
    hay = tmp_path / "hay.txt"
    hay.write_text(" ".join(DISTRACTORS))
    niah = load_items("niah", tok, [160], data=str(hay), depths=(0.0, 1.0))
    assert [it.id for it in niah] == ["niah-160-0", "niah-160-1"]
    assert all("San Francisco" in it.question and "Dolores Park" in it.context for it in niah)


def test_every_system_end_to_end_on_smollm2(smollm2, tmp_path):
    """MemAgent, full context and the LycheeMemory loop (no gate: the gate runs on the tiny model above) on
    SmolLM2-135M-Instruct on CPU, through the harness, on one short synthetic question: each produces a parseable
    answer and pays for what it read. Generations are kept to 4 tokens (about 1 s each on one thread)."""
    from memcomp import CompressorConfig, MemoryCompressor
    from memcomp.rl.engine import HFEngine

    model, tok = smollm2
    comp = MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=4))
    path = tmp_path / "distractors.txt"
    path.write_text("\n\n".join(DISTRACTORS))
    items = load_items("synthetic", comp.tokenizer, [128], data=str(path), num_questions=1, hops=1)
    settings = GenerationSettings(memory_tokens=4, answer_tokens=4, temperature=0, top_p=1.0)
    cfg = HarnessConfig(systems=("lychee-nogate", "memagent", "full"), generation=settings, block_tokens=96,
                        chunk_tokens=96, store_dir=str(tmp_path / "s"))
    report = run_eval(comp, HFEngine(comp), items, cfg, progress=False)
    rows = {r["system"]: r for r in report["rows"]}
    assert list(rows) == ["lychee-nogate", "memagent", "full"] and not any(r["skipped"] for r in rows.values())
    for q in report["questions"]:
        assert isinstance(q["prediction"], str) and q["tokens_generated"] > 0, q
    context_tokens = comp.tokenize(items[0].context).numel()
    assert rows["lychee-nogate"]["blocks_read"] == rows["lychee-nogate"]["blocks_total"] == -(-context_tokens // 96)
    assert rows["memagent"]["blocks_read"] == -(-context_tokens // 96) >= 2
    assert rows["full"]["positions_prefilled"] > context_tokens
