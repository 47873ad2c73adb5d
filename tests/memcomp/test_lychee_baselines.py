"""memcomp.lychee.baselines: MemAgent over raw-text chunks and full context, in the reasoner's harness -- exact
chunks and prompts from a scripted engine, batching, the same settings and accounting as LycheeMemory, a block store
as the context, window errors naming both numbers, end to end on the HF engine, bad input."""

import math

import pytest
import torch
from lychee_testutil import ScriptedEngine, memory_slot
from testutil import TEXTS

from memcomp.lychee.baselines import FullContext, FullContextConfig, MemAgent, MemAgentConfig
from memcomp.lychee.prompts import FINAL, FULL_CONTEXT, MEMAGENT_UPDATE, NO_MEMORY, Prompts
from memcomp.lychee.reasoner import GenerationSettings
from memcomp.lychee.store import BlockStore, BlockStoreConfig
from memcomp.rl.engine import HFEngine

GREEDY = GenerationSettings(memory_tokens=24, answer_tokens=16, temperature=0, top_p=1.0)
CONTEXT = TEXTS[0] + " " + TEXTS[1]
QUESTIONS = ["Which file opens the stream?", "What can be supplied?"]


def ids_of(part):
    return part.tolist() if isinstance(part, torch.Tensor) else list(part)


def section_respond(request, text, options):
    """Updates append the number of the chunk they saw (its first token id); the final prompt boxes the memory."""
    memory = memory_slot(text)
    if "<section>" not in text:
        return f"\\boxed{{{memory}}}"
    return f"{memory} s{len(text)}"


def test_memagent_reads_every_chunk_in_order(make_compressor):
    comp = make_compressor()
    tok = comp.tokenizer
    ids = tok(CONTEXT, add_special_tokens=False)["input_ids"]
    C = 16
    engine = ScriptedEngine(tok, section_respond)
    settings = GenerationSettings(memory_tokens=64, answer_tokens=64, temperature=0, top_p=1.0)
    (res,) = MemAgent(comp, engine, MemAgentConfig(generation=settings, chunk_tokens=C)).answer(QUESTIONS[:1],
                                                                                                [CONTEXT])
    n = math.ceil(len(ids) / C)
    assert n >= 3
    assert len(engine.calls) == n + 1 and res.blocks_read == tuple(range(n))
    memory, positions = NO_MEMORY, 0
    for j, (reqs, opts) in enumerate(engine.calls[:n]):
        r = reqs[0]
        assert r.memory is None and r.prefix is None and opts.max_new_tokens == 64
        chunk = tok.decode(ids[j * C:(j + 1) * C])
        text = MEMAGENT_UPDATE.format(problem=QUESTIONS[0], memory=memory, section=chunk)
        assert engine.texts[j] == text
        memory = f"{memory} s{len(text)}"
        positions += len(ids_of(r.prompt))
    (final,), opts = engine.calls[n]
    assert engine.texts[n] == FINAL.format(problem=QUESTIONS[0], memory=memory) and opts.max_new_tokens == 64
    positions += len(ids_of(final.prompt))
    assert res.answer == memory and res.memories[-1] == memory and res.gate_scores == {}
    assert not any(st.truncated for st in res.steps)
    assert res.cost.positions_prefilled == positions and res.cost.gate_positions == 0
    assert res.cost.engine_requests == n + 1
    # The chunk tokens are spliced in as they are: the section slot of update j holds ids[jC:(j+1)C] exactly.
    prompt = ids_of(engine.calls[1][0][0].prompt)
    assert any(prompt[s:s + C] == ids[C:2 * C] for s in range(len(prompt)))


def test_memagent_batches_and_reads_a_block_store(make_compressor, tmp_path):
    """Contexts of different lengths together give the results of each alone; a block store's token stream is read
    as the same tokens as its text."""
    comp = make_compressor()
    contexts = [CONTEXT, TEXTS[2]]
    agent = lambda e: MemAgent(comp, e, MemAgentConfig(generation=GREEDY, chunk_tokens=16))  # noqa: E731

    def fields(r):
        return r.answer, r.steps, r.cost.positions_prefilled, r.cost.tokens_generated, r.cost.engine_requests

    together = agent(ScriptedEngine(comp.tokenizer, section_respond)).answer(QUESTIONS, contexts)
    alone = [agent(ScriptedEngine(comp.tokenizer, section_respond)).answer([q], [c])[0]
             for q, c in zip(QUESTIONS, contexts)]
    assert [fields(r) for r in together] == [fields(r) for r in alone]
    assert len(together[0].steps) != len(together[1].steps)
    store = BlockStore.build(comp, CONTEXT, tmp_path / "s", BlockStoreConfig(block_tokens=8), progress=False)
    from_store = agent(ScriptedEngine(comp.tokenizer, section_respond)).answer(QUESTIONS[:1], [store])
    assert fields(from_store[0]) == fields(together[0])


def test_same_settings_as_lycheememory(make_compressor):
    """One GenerationSettings drives every system: the options each sends to the engine are the same."""
    from lychee_testutil import chain_respond, coded_block

    from memcomp.lychee.reasoner import LycheeReasoner, ReasonerConfig

    comp = make_compressor()
    settings = GenerationSettings(memory_tokens=24, answer_tokens=16, temperature=0.7, top_p=0.95, seed=5)
    a, b, c = (ScriptedEngine(comp.tokenizer, r) for r in (section_respond, chain_respond,
                                                            lambda r, t, o: "\\boxed{x}"))
    assert len(comp.tokenize(TEXTS[2])) <= 64
    MemAgent(comp, a, MemAgentConfig(generation=settings, chunk_tokens=64)).answer(QUESTIONS[:1], [TEXTS[2]])
    LycheeReasoner(comp, b, config=ReasonerConfig(generation=settings)).answer(
        QUESTIONS[:1], [[coded_block(0, 2, comp.hidden_size)]])
    FullContext(comp, c, FullContextConfig(generation=settings)).answer(QUESTIONS[:1], [TEXTS[2]])
    opts = [[o for _, o in e.calls] for e in (a, b, c)]
    assert opts[0] == opts[1]                        # one chunk / one block: one update, then the answer
    assert opts[0][0].seed == 5 and opts[0][1].seed == 6   # call i samples with seed + i
    assert (opts[2][0].temperature, opts[2][0].top_p, opts[2][0].max_new_tokens) == (0.7, 0.95, 16)


def test_full_context_prompt_and_window(make_compressor):
    comp = make_compressor()
    engine = ScriptedEngine(comp.tokenizer, lambda r, t, o: "\\boxed{open}")
    fc = FullContext(comp, engine, FullContextConfig(generation=GREEDY))
    out = fc.answer(QUESTIONS, [CONTEXT, TEXTS[2]])
    assert len(engine.calls) == 1 and len(engine.calls[0][0]) == 2          # every question in one engine call
    assert engine.texts[0] == FULL_CONTEXT.format(problem=QUESTIONS[0], context=CONTEXT)
    assert [r.answer for r in out] == ["open", "open"] and out[0].steps == ()
    assert out[0].cost.positions_prefilled == len(ids_of(engine.calls[0][0][0].prompt))
    # The window: prompt + answer_tokens must fit; exactly at the window is fine, one position more is not.
    need = len(ids_of(engine.calls[0][0][0].prompt)) + GREEDY.answer_tokens
    FullContext(comp, engine, FullContextConfig(generation=GREEDY, window=need)).answer(QUESTIONS[:1], [CONTEXT])
    prompt_len = need - GREEDY.answer_tokens
    with pytest.raises(ValueError, match=rf"question 0: the prompt is {prompt_len} tokens and the answer may take 16 "
                                         rf"more, {need} positions in all, more than the model's window of {need - 1}"):
        FullContext(comp, engine, FullContextConfig(generation=GREEDY, window=need - 1)).answer(QUESTIONS[:1],
                                                                                               [CONTEXT])
    with pytest.raises(ValueError, match="more than the model's window of 512"):  # the model's own window
        fc.answer(QUESTIONS[:1], [CONTEXT * 20])


def test_end_to_end_on_hf_engine(make_compressor):
    comp = make_compressor()
    settings = GenerationSettings(memory_tokens=5, answer_tokens=5, temperature=0, top_p=1.0)
    mem = MemAgent(comp, HFEngine(comp), MemAgentConfig(generation=settings, chunk_tokens=32)).answer(
        QUESTIONS, [CONTEXT, TEXTS[2]])
    full = FullContext(comp, HFEngine(comp), FullContextConfig(generation=settings)).answer(QUESTIONS, [CONTEXT,
                                                                                                      TEXTS[2]])
    for r in mem + full:
        assert isinstance(r.answer, str) and 0 < r.cost.tokens_generated and r.cost.positions_prefilled > 0
        assert r.run.peak_memory_kind == "rss_peak_delta" and r.run.wall_seconds > 0
    n = math.ceil(len(comp.tokenize(CONTEXT)) / 32)
    assert mem[0].blocks_read == tuple(range(n)) and mem[0].cost.engine_requests == n + 1
    # Greedy full context is what HF generate gives for the prompt's token ids.
    prompt = torch.tensor(Prompts(comp.tokenizer).full_context(QUESTIONS[1], TEXTS[2]))[None]
    assert full[1].cost.positions_prefilled == prompt.shape[1]
    ref = comp.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=5, pad_token_id=comp.tokenizer.pad_token_id)
    assert full[1].response == comp.tokenizer.decode(ref[0, prompt.shape[1]:], skip_special_tokens=True)


def test_bad_input(make_compressor):
    comp = make_compressor()
    engine = ScriptedEngine(comp.tokenizer, section_respond)
    agent = MemAgent(comp, engine, MemAgentConfig(generation=GREEDY, chunk_tokens=16))
    with pytest.raises(ValueError, match="context 1 is empty"):
        agent.answer(QUESTIONS, [CONTEXT, ""])
    with pytest.raises(ValueError, match="2 questions but 1 contexts"):
        agent.answer(QUESTIONS, [CONTEXT])
    with pytest.raises(TypeError, match="one context per question"):
        agent.answer(QUESTIONS[:1], CONTEXT)
    with pytest.raises(TypeError, match="context 0 is a int"):
        agent.answer(QUESTIONS[:1], [3])
    with pytest.raises(ValueError, match="no questions"):
        agent.answer([], [])
    assert engine.calls == []
    with pytest.raises(ValueError, match=r"an update step needs up to \d+ positions .* more than the model's window "
                                         r"of 512"):
        MemAgent(comp, engine, MemAgentConfig(generation=GREEDY, chunk_tokens=5000)).answer(QUESTIONS[:1],
                                                                                           [CONTEXT * 40])
    for kwargs in ({"chunk_tokens": 0}, {"window": 0}):
        with pytest.raises(ValueError):
            MemAgentConfig(**kwargs)
    with pytest.raises(ValueError):
        FullContextConfig(window=-1)
    with pytest.raises(TypeError, match="GenerationEngine"):
        FullContext(comp, object())
