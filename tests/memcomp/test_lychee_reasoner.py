"""memcomp.lychee.reasoner and prompts: the loop driven by a scripted engine produces exactly the expected prompts,
enforces the working-memory cap, honours the gate's choices in both modes, batches across questions with the same
results as one question at a time, accounts its cost; end to end on the HF engine and a block store; bad input."""

import pytest
import torch
from lychee_testutil import ScriptedEngine, ScriptedGate, block_code, chain_respond, coded_block, memory_slot
from testutil import TEXTS

from memcomp.lychee.gate import Gate
from memcomp.lychee.prompts import (
    FINAL,
    FULL_CONTEXT,
    GATE,
    GATE_PREFIX,
    LYCHEE_PREFIX,
    LYCHEE_UPDATE,
    MEMAGENT_UPDATE,
    NO_MEMORY,
    Prompts,
    PromptTemplate,
)
from memcomp.lychee.reasoner import GenerationSettings, LycheeReasoner, ReasonerConfig
from memcomp.lychee.store import BlockStore, BlockStoreConfig
from memcomp.memory import MemoryMismatchError
from memcomp.rl.engine import HFEngine

GREEDY = GenerationSettings(memory_tokens=40, answer_tokens=32, temperature=0, top_p=1.0)
QUESTIONS = ["Where was Tom born?", "Which file opens the stream?", "What does the sort order use?"]


def ids_of(part):
    return part.tolist() if isinstance(part, torch.Tensor) else list(part)


def run(comp, questions, blocks, *, gate=None, settings=GREEDY, respond=chain_respond, **config):
    engine = ScriptedEngine(comp.tokenizer, respond)
    reasoner = LycheeReasoner(comp, engine, gate, ReasonerConfig(generation=settings, **config))
    return reasoner.answer(questions, blocks), engine


def test_prompts_render_the_templates(make_compressor):
    """Ids decode to exactly the template's text, with slot values given as text or as ids."""
    tok = make_compressor().tokenizer
    p = Prompts(tok)
    q, mem, sec = "Where was Tom born?", "Tom was born in Lumbar.", "Document 1:\nText."
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert tok.decode(p.no_memory_ids) == NO_MEMORY == "No previous memory"
    for problem, memory in ((q, mem), (ids(q), torch.tensor(ids(mem)))):
        prefix, prompt = p.lychee_update(problem, memory)
        assert tok.decode(prefix) == LYCHEE_PREFIX.format()
        assert tok.decode(prompt) == LYCHEE_UPDATE.format(problem=q, memory=mem)
        assert tok.decode(p.final(problem, memory)) == FINAL.format(problem=q, memory=mem)
        assert tok.decode(p.memagent_update(problem, memory, sec)) == MEMAGENT_UPDATE.format(
            problem=q, memory=mem, section=sec)
        assert tok.decode(p.full_context(problem, sec)) == FULL_CONTEXT.format(problem=q, context=sec)
        g_prefix, g_prompt = p.gate(problem, memory)
        assert g_prefix == [] and GATE_PREFIX.format() == ""
        assert tok.decode(g_prompt) == GATE.format(problem=q, memory=mem)
    final = FINAL.format(problem=q, memory=mem)
    assert "\\boxed{}" in final and final.index("<problem>") < final.index("<memory>")  # MemAgent's order
    update = LYCHEE_UPDATE.format(problem=q, memory=mem)
    assert update.rstrip().endswith("<|im_start|>assistant") and "Updated memory:" in update
    # Slots are spliced as ids: a memory's ids come back unchanged even where re-tokenizing would merge them.
    odd = ids("ab") + ids("c")
    assert p.render(PromptTemplate("[{memory}]"), memory=odd)[len(ids("[")):][: len(odd)] == odd
    with pytest.raises(ValueError, match="missing \\['memory'\\]"):
        p.render(FINAL, problem=q)
    with pytest.raises(ValueError, match="unknown \\['x'\\]"):
        FINAL.format(problem=q, memory=mem, x="")
    with pytest.raises(ValueError, match="plain name"):
        PromptTemplate("{0}")
    with pytest.raises(TypeError, match="1-D integer tensor"):
        p.final(q, torch.zeros(3))
    with pytest.raises(TypeError, match="str or token ids"):
        p.final(q, 3.5)


def test_loop_prompts_are_exact(make_compressor):
    """No gate: every block in order, each update prompt built from the previous memory the engine wrote, then the
    final prompt; settings, options, answer extraction and the cost counts."""
    comp = make_compressor()
    d, sizes = comp.hidden_size, [2, 5, 1]
    blocks = [coded_block(k, n, d) for k, n in enumerate(sizes)]
    (res,), engine = run(comp, QUESTIONS[:1], [blocks])
    assert [len(reqs) for reqs, _ in engine.calls] == [1, 1, 1, 1]
    memories = [NO_MEMORY, f"{NO_MEMORY} b0", f"{NO_MEMORY} b0 b1", f"{NO_MEMORY} b0 b1 b2"]
    expected_positions = 0
    for j, (reqs, opts) in enumerate(engine.calls[:3]):
        r = reqs[0]
        assert torch.equal(r.memory, blocks[j])
        assert comp.tokenizer.decode(ids_of(r.prefix)) == LYCHEE_PREFIX.format()
        assert comp.tokenizer.decode(ids_of(r.prompt)) == LYCHEE_UPDATE.format(problem=QUESTIONS[0],
                                                                                memory=memories[j])
        assert (opts.max_new_tokens, opts.temperature, opts.top_p, opts.n) == (40, 0, 1.0, 1)
        expected_positions += len(ids_of(r.prefix)) + 3 * sizes[j] + len(ids_of(r.prompt))  # per-embedding wrapper
    (final,), opts = engine.calls[3]
    assert final.memory is None and final.prefix is None and opts.max_new_tokens == 32
    assert comp.tokenizer.decode(ids_of(final.prompt)) == FINAL.format(problem=QUESTIONS[0], memory=memories[3])
    expected_positions += len(ids_of(final.prompt))
    assert res.answer == memories[3] and res.response == f"\\boxed{{{memories[3]}}}"
    assert res.blocks_read == (0, 1, 2) and res.memories == tuple(memories[1:]) and res.gate_scores == {}
    assert all(s.score is None and not s.truncated for s in res.steps)
    assert [s.memory_tokens for s in res.steps] == [len(comp.tokenizer(m)["input_ids"]) for m in memories[1:]]
    tokens = sum(len(comp.tokenizer(m)["input_ids"]) + 1 for m in memories[1:] + [res.response])  # + EOS each
    assert res.cost.positions_prefilled == expected_positions and res.cost.tokens_generated == tokens
    assert res.cost.engine_requests == 4 and res.cost.gate_positions == 0 and res.run.engine_calls == 4
    assert res.run.wall_seconds >= res.cost.latency_seconds > 0


def test_chat_end_token_stops_generation(make_compressor):
    """ChatML prompts: the turn end <|im_end|> is a stop token when the tokenizer has it as one token."""
    comp = make_compressor()
    comp.tokenizer.add_tokens(["<|im_end|>"], special_tokens=True)
    comp.model.resize_token_embeddings(len(comp.tokenizer))
    im_end = comp.tokenizer.convert_tokens_to_ids("<|im_end|>")
    _, engine = run(comp, QUESTIONS[:1], [[coded_block(0, 1, comp.hidden_size)]],
                    settings=GenerationSettings(memory_tokens=16, temperature=0, top_p=1.0, stop_token_ids=(7,)))
    assert all(opts.stop_token_ids == (7, im_end) for _, opts in engine.calls)


@pytest.mark.parametrize("obey_limit", [True, False])
def test_memory_cap(make_compressor, obey_limit):
    """A memory longer than memory_tokens is cut to its first memory_tokens tokens, whether the engine stopped at the
    limit (finish "length") or overran it; the next prompt carries exactly the kept ids."""
    comp = make_compressor()
    cap = 6
    long_tail = " and then some more words that run past the cap"
    engine = ScriptedEngine(comp.tokenizer, lambda r, t, o: chain_respond(r, t, o) + (
        long_tail if r.memory is not None and block_code(r.memory) == 0 else ""), obey_limit=obey_limit)
    settings = GenerationSettings(memory_tokens=cap, answer_tokens=64, temperature=0, top_p=1.0)
    blocks = [coded_block(k, 1, comp.hidden_size) for k in range(2)]
    (res,) = LycheeReasoner(comp, engine, config=ReasonerConfig(generation=settings)).answer(QUESTIONS[:1], [blocks])
    first = comp.tokenizer(f"{NO_MEMORY} b0{long_tail}", add_special_tokens=False)["input_ids"]
    assert len(first) > cap
    assert res.steps[0].memory_tokens == cap and res.steps[0].truncated
    assert res.steps[0].memory == comp.tokenizer.decode(first[:cap])
    second_prompt = ids_of(engine.calls[1][0][0].prompt)
    assert second_prompt == Prompts(comp.tokenizer).lychee_update(QUESTIONS[0], first[:cap])[1]
    assert engine.calls[0][1].max_new_tokens == cap
    # The second memory is short again, but the cut one is what it was built on.
    second = comp.tokenizer(memory_slot(comp.tokenizer.decode(second_prompt)) + " b1")["input_ids"]
    assert len(second) <= cap or res.steps[1].truncated
    returned = cap if obey_limit else len(first) + 1
    assert res.cost.tokens_generated >= returned


def test_prefilter_gate_choices_are_honoured(make_compressor):
    comp = make_compressor()
    d = comp.hidden_size
    table = {0: 0.2, 1: 0.9, 2: 0.49, 3: 0.5, 4: 0.7}
    gate = ScriptedGate(comp, lambda code, mem: table[code], thresholds=(0.5, 0.99))
    blocks = [coded_block(k, 2, d) for k in range(5)]
    (res,), engine = run(comp, QUESTIONS[:1], [blocks], gate=gate, gate_mode="prefilter")
    assert res.blocks_read == (1, 3, 4)  # score >= threshold, in document order
    assert res.gate_scores == pytest.approx(table) and [s.score for s in res.steps] == pytest.approx([0.9, 0.5, 0.7])
    assert [block_code(reqs[0].memory) for reqs, _ in engine.calls[:3]] == [1, 3, 4]
    q_ids = comp.tokenizer(QUESTIONS[0])["input_ids"]
    assert [(c, p, m) for c, p, m in gate.rows] == [(k, q_ids, None) for k in range(5)]  # question-only, all blocks
    row_positions = 3 * 2 + len(Prompts(comp.tokenizer).gate(q_ids, NO_MEMORY)[1])
    assert res.cost.gate_positions == 5 * row_positions
    # A threshold in the config overrides the gate's saved one.
    (res,), _ = run(comp, QUESTIONS[:1], [blocks], gate=ScriptedGate(comp, lambda c, m: table[c]),
                    gate_mode="prefilter", gate_threshold=0.6)
    assert res.blocks_read == (1, 4)
    # Nothing passes: straight to the final prompt, from the empty memory.
    (res,), engine = run(comp, QUESTIONS[:1], [blocks], gate=ScriptedGate(comp, lambda c, m: 0.0),
                         gate_mode="prefilter")
    assert res.blocks_read == () and res.answer == NO_MEMORY and len(engine.calls) == 1


def chain_scorer(code, memory):
    """Block 1 holds the first hop; block 3 is related only once the memory holds block 1's note."""
    if code == 1:
        return 0.9
    if code == 3:
        return 0.8 if "b1" in memory else 0.3
    return 0.1


@pytest.mark.parametrize("lookahead", [1, 3, 8])
def test_sequential_gate_reads_the_working_memory(make_compressor, lookahead):
    """The sequential gate scores each block with the memory at the time it would be read; looking ahead changes
    only the gate's cost, never its choices or scores."""
    comp = make_compressor()
    d = comp.hidden_size
    blocks = [coded_block(k, 1, d) for k in range(6)]
    gate = ScriptedGate(comp, chain_scorer)
    (res,), _ = run(comp, QUESTIONS[:1], [blocks], gate=gate, gate_mode="sequential", gate_lookahead=lookahead)
    assert res.blocks_read == (1, 3)
    assert res.gate_scores == pytest.approx({0: 0.1, 1: 0.9, 2: 0.1, 3: 0.8, 4: 0.1, 5: 0.1})
    assert res.answer == f"{NO_MEMORY} b1 b3"
    decisive = {}
    for code, _, mem in gate.rows:
        decisive.setdefault(code, []).append(mem)
    assert all(m is not None for ms in decisive.values() for m in ms)  # the sequential gate always reads a memory
    assert "b1" in decisive[3][-1]
    # Cost: with look-ahead 1 each block is scored once; further look-ahead rescores blocks after a read.
    q_ids = comp.tokenizer(QUESTIONS[0])["input_ids"]
    positions = sum(3 + len(Prompts(comp.tokenizer).gate(q_ids, mem)[1]) for _, _, mem in gate.rows)
    assert res.cost.gate_positions == positions
    assert (len(gate.rows) == 6) == (lookahead == 1) and len(gate.rows) >= 6


def test_batching_across_questions_is_exact(make_compressor):
    """Questions with 1, 4 and 2 blocks (of different sizes) answered together give the results of answering each
    alone, with and without a sequential gate; short questions leave the batch early."""
    comp = make_compressor()
    d = comp.hidden_size
    sources = [[coded_block(10 * q + k, 1 + (q + k) % 3, d) for k in range(n)] for q, n in enumerate([1, 4, 2])]

    def scorer(code, memory):  # question 1 follows the chain; the others' blocks all pass
        return chain_scorer(code % 10, memory) if code // 10 == 1 else 0.9

    def fields(r):
        return (r.question, r.answer, r.response, r.steps, r.gate_scores, r.cost.positions_prefilled,
                r.cost.gate_positions, r.cost.tokens_generated, r.cost.engine_requests)

    for make_gate in (lambda: None, lambda: ScriptedGate(comp, scorer)):
        batched, engine = run(comp, QUESTIONS, sources, gate=make_gate(), gate_lookahead=2)
        alone = [run(comp, [q], [s], gate=make_gate(), gate_lookahead=2)[0][0] for q, s in zip(QUESTIONS, sources)]
        assert [fields(r) for r in batched] == [fields(r) for r in alone]
        if make_gate() is None:
            kinds = [("final" if reqs[0].memory is None else "update", len(reqs)) for reqs, _ in engine.calls]
            assert kinds == [("update", 3), ("update", 2), ("final", 1), ("update", 1), ("final", 1),
                             ("update", 1), ("final", 1)]
            lat = [r.cost.latency_seconds for r in batched]
            assert lat[0] < lat[2] < lat[1]
    assert [r.blocks_read for r in batched] == [(0,), (1, 3), (0, 1)]


def test_peak_memory_is_measured_per_call(make_compressor):
    """On CPU: the growth of the process's peak RSS over the call, the peak reset at its start."""
    comp = make_compressor()
    blocks = [[coded_block(0, 1, comp.hidden_size)]]
    big = 64 * 2**20
    engine = ScriptedEngine(comp.tokenizer, chain_respond, allocate_bytes=big)
    (res,) = LycheeReasoner(comp, engine, config=ReasonerConfig(generation=GREEDY)).answer(QUESTIONS[:1], blocks)
    assert res.run.peak_memory_kind == "rss_peak_delta"
    assert res.run.peak_memory_bytes >= 0.9 * big
    (res,), _ = run(comp, QUESTIONS[:1], blocks)  # after the big call: the reset keeps it from reading that peak
    assert res.run.peak_memory_bytes < big / 2
    assert res.run.memory_seconds > 0 and res.run.answer_seconds > 0 and res.run.gate_seconds == 0


def test_end_to_end_on_hf_engine_and_block_store(make_compressor, tmp_path):
    """The HF engine and a block store: the first update is what the compressor itself generates for that block and
    prompt, every result is parseable, a real (untrained) gate with a given threshold runs in both modes and the
    model is left without hooks."""
    comp = make_compressor()
    store = BlockStore.build(comp, TEXTS[0] + " " + TEXTS[1], tmp_path / "s", BlockStoreConfig(block_tokens=16),
                             progress=False)
    assert len(store) >= 3
    settings = GenerationSettings(memory_tokens=6, answer_tokens=6, temperature=0, top_p=1.0)
    reasoner = LycheeReasoner(comp, HFEngine(comp), config=ReasonerConfig(generation=settings))
    out = reasoner.answer(QUESTIONS[:2], [store, store])
    prefix, prompt = Prompts(comp.tokenizer).lychee_update(QUESTIONS[0], NO_MEMORY)
    first = comp.generate(store[0], prompt, prefixes=[prefix], max_new_tokens=6)[0]
    assert out[0].steps[0].memory == first
    for r in out:
        assert r.blocks_read == tuple(range(len(store))) and isinstance(r.answer, str)
        assert r.cost.positions_prefilled > 0 and 0 < r.cost.tokens_generated <= 6 * (len(store) + 1)
    gate = Gate(comp)
    for mode in ("prefilter", "sequential"):
        cfg = ReasonerConfig(generation=settings, gate_mode=mode, gate_threshold=0.5)
        (r,) = LycheeReasoner(comp, HFEngine(comp), gate, cfg).answer(QUESTIONS[:1], [store])
        assert r.gate_scores == pytest.approx({k: 0.5 for k in range(len(store))})  # zero head: p = 0.5 everywhere
        assert r.blocks_read == tuple(range(len(store))) and r.cost.gate_positions > 0
    assert not any(m._forward_hooks for m in comp.modules())


def test_bad_input(make_compressor, tmp_path):
    comp = make_compressor()
    d = comp.hidden_size
    blocks = [coded_block(0, 1, d)]
    engine = ScriptedEngine(comp.tokenizer, chain_respond)
    budget = len(comp.tokenizer("Where?")["input_ids"])
    reasoner = LycheeReasoner(comp, engine, config=ReasonerConfig(generation=GenerationSettings(
        question_tokens=budget, temperature=0, top_p=1.0, memory_tokens=16, answer_tokens=16)))
    with pytest.raises(ValueError, match="no questions"):
        reasoner.answer([], [])
    with pytest.raises(TypeError, match="list of str"):
        reasoner.answer("Where?", [blocks])
    with pytest.raises(ValueError, match="question 0 is empty"):
        reasoner.answer(["  "], [blocks])
    long_q = "Where was the person with the long name born?"
    n = len(comp.tokenizer(long_q)["input_ids"])
    with pytest.raises(ValueError, match=f"question 1 is {n} tokens, longer than its budget of {budget} tokens"):
        reasoner.answer(["Where?", long_q], [blocks, blocks])
    with pytest.raises(ValueError, match="2 questions but 1 block sources"):
        reasoner.answer(["Where?", "Who?"], [blocks])
    with pytest.raises(ValueError, match="question 0 has no blocks"):
        reasoner.answer(["Where?"], [[]])
    with pytest.raises(TypeError, match="one block source per question"):
        reasoner.answer(["Where?"], blocks[0])
    with pytest.raises(TypeError, match="block 0 of question 0 is a str"):
        reasoner.answer(["Where?"], [["text"]])
    assert engine.calls == []  # refused before any generation
    # A block store and a gate of another compressor.
    other = make_compressor(seed=1)
    store = BlockStore.build(other, TEXTS[0], tmp_path / "other", BlockStoreConfig(block_tokens=16), progress=False)
    with pytest.raises(MemoryMismatchError, match="fingerprint"):
        reasoner.answer(["Where?"], [store])
    with pytest.raises(MemoryMismatchError, match="trained for compressor"):
        LycheeReasoner(comp, engine, Gate(other), ReasonerConfig(gate_threshold=0.5))
    with pytest.raises(ValueError, match="no sequential threshold"):
        LycheeReasoner(comp, engine, Gate(comp))
    with pytest.raises(MemoryMismatchError, match="fingerprint"):  # a Memory block of another compressor
        LycheeReasoner(comp, HFEngine(comp), config=ReasonerConfig(generation=GREEDY)).answer(
            ["Where?"], [[other.encode(TEXTS[0])]])
    # An update that cannot fit the model's window.
    small = LycheeReasoner(comp, engine, config=ReasonerConfig(generation=GREEDY, window=100))
    with pytest.raises(ValueError, match=r"needs up to \d+ positions .* more than the model's window of 100"):
        small.answer(["Where?"], [blocks])

    class Broken(ScriptedEngine):
        def generate(self, requests, options):
            return super().generate(requests, options)[:-1]

    with pytest.raises(RuntimeError, match="expected one per request"):
        LycheeReasoner(comp, Broken(comp.tokenizer, chain_respond), config=ReasonerConfig(generation=GREEDY)).answer(
            ["A?", "B?"], [blocks, blocks])
    for kwargs in ({"gate_mode": "both"}, {"gate_lookahead": 0}, {"gate_batch_size": 0}, {"gate_threshold": "x"},
                   {"window": 0}):
        with pytest.raises(ValueError):
            ReasonerConfig(**kwargs)
    for kwargs in ({"memory_tokens": 0}, {"temperature": 0}, {"top_p": 0}, {"seed": -1}):
        with pytest.raises(ValueError):
            GenerationSettings(**kwargs)
    with pytest.raises(TypeError, match="GenerationEngine"):
        LycheeReasoner(comp, object())
