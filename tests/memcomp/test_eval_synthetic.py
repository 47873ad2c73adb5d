"""memcomp.eval.synthetic: invented multi-hop facts among distractors, block labels and ideal memory traces."""

import json
import math
import re

import pytest
from eval_testutil import WordTokenizer

from memcomp.eval.documents import Blocks
from memcomp.eval.synthetic import (
    NO_MEMORY,
    SyntheticConfig,
    SyntheticExample,
    example_blocks,
    generate_dataset,
    generate_example,
    memory_trace,
    write_synthetic,
)

NAME = r"[A-Z][a-z]+"
BORN = re.compile(rf"^(?:(?P<p1>{NAME} {NAME}) was born in (?:the city of )?(?P<c1>{NAME})|"
                  rf"The birthplace of (?P<p2>{NAME} {NAME}) is (?P<c2>{NAME}))\.$")
LOCATED = re.compile(rf"^(?P<c>{NAME}) (?:is in|is a city in|lies in) (?P<k>{NAME})\.$")
SYLLABLES = re.compile(r"^(?:(?:br|dr|gr|kr|st|tr|th|sh|[bdfghklmnprstvz])[aeiou][nrlsm]?)+"
                       r"(?:ton|burg|ford|vale|port|ia|land|stan|ora)?$")
DISTRACTORS = [f"Paragraph {i} explains how the sort order of the list can be customized with a key function."
               for i in range(12)]


def born(fact):
    m = BORN.match(fact)
    assert m, fact
    return (m["p1"] or m["p2"]), (m["c1"] or m["c2"])


def mentions(text, name):
    return re.search(rf"\b{re.escape(name)}\b", text, re.IGNORECASE) is not None


@pytest.mark.parametrize("seed", range(12))
def test_two_hop_facts_and_question(seed):
    ex = generate_example([], SyntheticConfig(hops=2, num_distractors=0, num_confusers=0), seed=seed)
    assert len(ex.documents) == 2 and sorted(ex.documents) == sorted(ex.facts)
    assert [ex.documents[p] for p in ex.evidence] == list(ex.facts)
    person, city = born(ex.facts[0])
    loc = LOCATED.match(ex.facts[1])
    assert loc and loc["c"] == city and loc["k"] == ex.answer
    assert ex.question == f"In which country was {person} born?"
    for word in person.split() + [city, ex.answer]:
        assert SYLLABLES.match(word.lower()), word
    assert ex.hops == 2 and ex.seed == seed


def test_one_hop():
    ex = generate_example([], SyntheticConfig(hops=1, num_distractors=0, num_confusers=0), seed=5)
    assert len(ex.facts) == 1 and ex.documents == ex.facts and ex.evidence == (0,)
    person, city = born(ex.facts[0])
    assert ex.answer == city and ex.question == f"In which city was {person} born?"


def test_distractors_confusers_and_answer_uniqueness():
    cfg = SyntheticConfig(hops=2, num_distractors=5, num_confusers=3)
    for seed in range(8):
        ex = generate_example(DISTRACTORS, cfg, seed=seed)
        assert len(ex.documents) == 2 + 3 + 5 and len(set(ex.documents)) == 10
        others = [d for p, d in enumerate(ex.documents) if p not in ex.evidence]
        distractors = [d for d in others if d in DISTRACTORS]
        confusers = [d for d in others if d not in DISTRACTORS]
        assert len(distractors) == 5 and len(confusers) == 3
        person, city = born(ex.facts[0])
        for c in confusers:
            assert BORN.match(c) or LOCATED.match(c), c
            words = set(re.findall(NAME, c)) - {"The"}
            assert not words & set(person.split() + [city, ex.answer]), c
        # The answer is stated only by the location fact; the person only by the birth fact.
        assert [p for p, d in enumerate(ex.documents) if mentions(d, ex.answer)] == [ex.evidence[1]]
        assert [p for p, d in enumerate(ex.documents) if mentions(d, person)] == [ex.evidence[0]]


def test_distractors_that_mention_an_invented_name_are_skipped():
    cfg = SyntheticConfig(hops=2, num_distractors=5, num_confusers=0)
    base = generate_example(DISTRACTORS[:5], cfg, seed=11)
    poisoned = DISTRACTORS[:5] + [f"A note about {base.answer.upper()} and more."]
    ex = generate_example(poisoned, cfg, seed=11)
    assert (ex.question, ex.answer, ex.facts) == (base.question, base.answer, base.facts)  # names drawn first
    assert sorted(d for d in ex.documents if d not in ex.facts) == sorted(DISTRACTORS[:5])
    with pytest.raises(ValueError, match="not enough for 6 distractors"):
        generate_example(poisoned, SyntheticConfig(num_distractors=6, num_confusers=0), seed=11)


def test_deterministic_and_extendable():
    cfg = SyntheticConfig(num_distractors=3)
    assert generate_example(DISTRACTORS, cfg, seed=4) == generate_example(DISTRACTORS, cfg, seed=4)
    three = generate_dataset(DISTRACTORS, 3, cfg, seed=1)
    assert generate_dataset(DISTRACTORS, 2, cfg, seed=1) == three[:2]
    assert len({ex.question for ex in three}) == 3
    assert generate_dataset(DISTRACTORS, 3, cfg, seed=2) != three


def test_target_tokens_adds_distractors_until_reached():
    tok = WordTokenizer()
    words = [f"w{i}" for i in range(10)]
    pool = [" ".join(words) + f" x{i}." for i in range(20)]  # 11 word tokens each
    target = 150
    ex = generate_example(pool, SyntheticConfig(num_distractors=0, num_confusers=1, target_tokens=target), seed=2,
                          tokenizer=tok)
    # Each document costs its words plus 2 header tokens ("Document", "i:"); distractors 13 each.
    fixed = sum(len(d.split()) + 2 for d in ex.documents if d not in pool)
    n = sum(d in pool for d in ex.documents)
    assert n == math.ceil((target - fixed) / 13)
    assert len(tok(ex.context)["input_ids"]) >= target
    # num_distractors is a floor.
    ex = generate_example(pool, SyntheticConfig(num_distractors=15, num_confusers=1, target_tokens=target), seed=2,
                          tokenizer=tok)
    assert sum(d in pool for d in ex.documents) == 15
    with pytest.raises(ValueError, match="pass the tokenizer"):
        generate_example(pool, SyntheticConfig(target_tokens=target), seed=2)
    with pytest.raises(ValueError, match="not enough"):
        generate_example(pool[:3], SyntheticConfig(num_distractors=0, target_tokens=target), seed=2, tokenizer=tok)


def test_example_blocks_label_the_evidence_documents():
    ex = generate_example(DISTRACTORS, SyntheticConfig(num_distractors=6, num_confusers=2), seed=3)
    blocks = example_blocks(ex, WordTokenizer(), 16)
    evidence_word = []  # word-level truth by counting: 2 header words, then the document's words
    for p, doc in enumerate(ex.documents):
        evidence_word += [False, False] + [p in ex.evidence] * len(doc.split())
    assert len(evidence_word) == len(blocks.input_ids)
    assert blocks.related == tuple(any(evidence_word[s:e]) for s, e in blocks.token_spans)
    assert 1 <= sum(blocks.related) < blocks.num_blocks

    trace = memory_trace(ex, blocks, list(range(blocks.num_blocks)))
    assert trace.final_answer == f"\\boxed{{{ex.answer}}}"
    # Reading in order, fact j becomes known at the last block that holds part of it.
    known_at = [max(blocks.evidence_blocks[j]) for j in range(2)]
    for step in range(blocks.num_blocks):
        known = sorted((j for j in range(2) if known_at[j] <= step), key=lambda j: (known_at[j], j))
        assert trace.found[step] == tuple(known)
        assert trace.memories[step] == (" ".join(ex.facts[j] for j in known) if known else NO_MEMORY)


def _hand_example():
    ex = SyntheticExample(question="In which country was Ba Ko born?", answer="Zuria", documents=("x", "F0.", "F1."),
                          evidence=(1, 2), facts=("F0.", "F1."), hops=2, seed=0)
    blocks = Blocks(input_ids=tuple(range(8)), block_size=2, token_spans=((0, 2), (2, 4), (4, 6), (6, 8)),
                    char_spans=((0, 3), (4, 7), (8, 11), (12, 15)), related=(False, True, True, True),
                    evidence_blocks=((1,), (2, 3)))
    return ex, blocks


def test_memory_trace_exact():
    ex, blocks = _hand_example()
    t = memory_trace(ex, blocks, [0, 2, 1, 3])
    assert t.block_order == (0, 2, 1, 3)
    assert t.memories == (NO_MEMORY, NO_MEMORY, "F0.", "F0. F1.")  # F1 straddles blocks 2 and 3
    assert t.found == ((), (), (0,), (0, 1))
    assert t.final_answer == "\\boxed{Zuria}"
    t = memory_trace(ex, blocks, [3, 2, 1], empty_memory="(empty)")
    assert t.memories == ("(empty)", "F1.", "F1. F0.")  # in the order found
    assert t.final_answer == "\\boxed{Zuria}"
    t = memory_trace(ex, blocks, [1, 3])  # the gate skipped block 2: the answer is not derivable
    assert t.memories == ("F0.", "F0.") and t.final_answer is None
    assert memory_trace(ex, blocks, []).final_answer is None


def test_memory_trace_rejects_bad_input():
    ex, blocks = _hand_example()
    with pytest.raises(ValueError, match="read twice"):
        memory_trace(ex, blocks, [1, 1])
    with pytest.raises(ValueError, match="out of range"):
        memory_trace(ex, blocks, [4])
    with pytest.raises(TypeError, match="not an int"):
        memory_trace(ex, blocks, [1.0])
    one_fact = SyntheticExample(question="q", answer="a", documents=("F0.",), evidence=(0,), facts=("F0.",), hops=1,
                                seed=0)
    with pytest.raises(ValueError, match="evidence spans"):
        memory_trace(one_fact, blocks, [0])


def test_write_synthetic(tmp_path):
    examples = generate_dataset(DISTRACTORS, 2, SyntheticConfig(num_distractors=2), seed=0)
    path = tmp_path / "synthetic.jsonl"
    assert write_synthetic(path, examples) == 2
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["answers"] == [examples[0].answer] and rows[0]["context"] == examples[0].context
    assert rows[1]["evidence"] == list(examples[1].evidence)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="item 1"):
        write_synthetic(path, [examples[0], {"question": "q"}])
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.jsonl"]


@pytest.mark.parametrize("kwargs, err", [(dict(hops=3), ValueError), (dict(hops=True), TypeError),
                                         (dict(num_distractors=-1), ValueError), (dict(target_tokens=0), ValueError),
                                         (dict(num_confusers=1.5), TypeError)])
def test_config_validation(kwargs, err):
    with pytest.raises(err):
        SyntheticConfig(**kwargs)


def test_generator_rejects_bad_input():
    with pytest.raises(TypeError, match="sequence of str"):
        generate_example("one long string", SyntheticConfig(num_distractors=0), seed=0)
    with pytest.raises(ValueError, match="distractor 1"):
        generate_example(["ok text.", " "], SyntheticConfig(num_distractors=0), seed=0)
    with pytest.raises(TypeError, match="seed"):
        generate_example([], SyntheticConfig(num_distractors=0), seed="0")
    with pytest.raises(ValueError, match="num_examples"):
        generate_dataset([], 0)
