"""memcomp.eval.ruler_hqa on a hand-made HotpotQA-format file: 3 questions x 4 paragraphs, one paragraph shared
by two questions (so the pool de-duplicates), sentences with HotpotQA's leading spaces."""

import copy
import json
import os
import random

import pytest
from eval_testutil import WordTokenizer

from memcomp.eval.documents import label_blocks
from memcomp.eval.ruler_hqa import (
    HotpotQAFormatError,
    RulerHQARecord,
    build_ruler_hqa,
    load_hotpotqa,
    read_ruler_hqa,
    write_ruler_hqa,
)

PARAS = {
    "Alpha": ["Alpha was born", " in Paris."],
    "Beta": ["Beta is a river."],
    "Gamma": ["Gamma is a city.", " It is old."],
    "Shared": ["Shared text is here."],
    "Delta": ["Delta wrote a book."],
    "Epsilon": ["Epsilon is a band."],
    "Zeta": ["Zeta plays chess."],
    "Eta": ["Eta is a lake.", " It is cold."],
    "Theta": ["Theta sings."],
    "Iota": ["Iota flows into Eta."],
    "Kappa": ["Kappa is a mountain."],
}
OWN = [["Alpha", "Beta", "Gamma", "Shared"], ["Shared", "Delta", "Epsilon", "Zeta"], ["Eta", "Theta", "Iota", "Kappa"]]
SUPPORT = [["Alpha", "Gamma"], ["Delta", "Shared"], ["Eta", "Iota"]]
ANSWERS = ["Paris", "a book", "Eta lake"]

# sorted(set("title\nparagraph")): the 11 unique paragraphs ("Shared" is in two questions).
POOL = ("Alpha\nAlpha was born in Paris.", "Beta\nBeta is a river.", "Delta\nDelta wrote a book.",
        "Epsilon\nEpsilon is a band.", "Eta\nEta is a lake. It is cold.", "Gamma\nGamma is a city. It is old.",
        "Iota\nIota flows into Eta.", "Kappa\nKappa is a mountain.", "Shared\nShared text is here.",
        "Theta\nTheta sings.", "Zeta\nZeta plays chess.")


def records():
    return [{"_id": f"q{i}", "question": f"Question {i}?", "answer": ANSWERS[i], "type": "bridge",
             "context": [[t, list(PARAS[t])] for t in OWN[i]], "supporting_facts": [[t, 0] for t in SUPPORT[i]]}
            for i in range(3)]


@pytest.fixture
def hotpot_file(tmp_path):
    path = tmp_path / "hotpot_dev_distractor_v1.json"
    path.write_text(json.dumps(records()))
    return path


def title(doc):
    return doc.split("\n")[0]


def test_pool_and_questions(hotpot_file):
    data = load_hotpotqa(hotpot_file)
    assert data.pool == POOL
    assert [q.paragraphs for q in data.questions] == [(0, 1, 5, 8), (8, 2, 3, 10), (4, 9, 6, 7)]
    assert [q.supporting for q in data.questions] == [(0, 5), (8, 2), (4, 6)]  # in context order
    assert [(q.index, q.id, q.question, q.answers) for q in data.questions] == [
        (0, "q0", "Question 0?", ("Paris",)), (1, "q1", "Question 1?", ("a book",)),
        (2, "q2", "Question 2?", ("Eta lake",))]
    assert load_hotpotqa(records()) == data  # parsed records work as the file does


@pytest.mark.parametrize("num_docs", [4, 7, 11])
def test_records_follow_memagents_construction(hotpot_file, num_docs):
    data = load_hotpotqa(hotpot_file)
    recs = build_ruler_hqa(data, num_docs)
    # MemAgent: own paragraphs first, then the draws, shuffled by random.Random(4) -- one permutation for all.
    order = list(range(num_docs))
    random.Random(4).shuffle(order)
    for q, rec in zip(data.questions, recs):
        own_docs = [POOL[k] for k in q.paragraphs]
        assert len(rec.documents) == num_docs == rec.num_docs
        assert rec.own == tuple(p for p in range(num_docs) if order[p] < 4)
        assert [rec.documents[p] for p in rec.own] == [own_docs[order[p]] for p in rec.own]
        drawn = [rec.documents[p] for p in range(num_docs) if p not in rec.own]
        assert len(set(drawn)) == num_docs - 4 and not set(drawn) & set(own_docs) and set(drawn) <= set(POOL)
        assert sorted(title(rec.documents[p]) for p in rec.gold) == sorted(SUPPORT[q.index])
        assert (rec.question, rec.answers, rec.id) == (q.question, q.answers, q.id)
        context = rec.context
        expected = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(rec.documents))
        assert context == expected
        assert context.startswith("Document 1:\n") and f"Document {num_docs}:\n" in context
        assert f"Document {num_docs + 1}:" not in context
        assert [context[s:e] for s, e in rec.gold_spans()] == [rec.documents[p] for p in rec.gold]
    if num_docs == 11:  # the whole pool
        assert all(set(r.documents) == set(POOL) for r in recs)


def test_pinned_draws_at_seed_42(hotpot_file):
    """The exact documents at N = 6 (a changed seeding would silently change every published number)."""
    recs = build_ruler_hqa(load_hotpotqa(hotpot_file), 6)
    assert [[title(d) for d in r.documents] for r in recs] == [
        ["Shared", "Iota", "Theta", "Alpha", "Gamma", "Beta"],
        ["Zeta", "Alpha", "Theta", "Shared", "Epsilon", "Delta"],
        ["Kappa", "Epsilon", "Zeta", "Eta", "Iota", "Theta"]]
    assert [r.gold for r in recs] == [(3, 4), (3, 5), (3, 4)]
    assert [r.own for r in recs] == [(0, 3, 4, 5)] * 3
    other = build_ruler_hqa(load_hotpotqa(hotpot_file), 6, seed=7)
    assert [[title(d) for d in r.documents] for r in other][1] == ["Zeta", "Theta", "Beta", "Shared", "Epsilon",
                                                                   "Delta"]


@pytest.mark.parametrize("num_docs", [5, 8, 11])
def test_draws_are_random_sample_of_the_candidate_list(hotpot_file, num_docs):
    """MemAgent's draw, restated: random.sample(addition_docs, N - own) where addition_docs lists the pool indices
    not among the question's own, with the question's generator."""
    data = load_hotpotqa(hotpot_file)
    order = list(range(num_docs))
    random.Random(4).shuffle(order)
    for q, rec in zip(data.questions, build_ruler_hqa(data, num_docs)):
        addition_docs = [k for k in range(len(POOL)) if k not in q.paragraphs]
        rng = random.Random(f"memcomp.ruler_hqa:42:{num_docs}:{q.index}")
        expected = [POOL[k] for k in list(q.paragraphs) + rng.sample(addition_docs, num_docs - 4)]
        assert list(rec.documents) == [expected[o] for o in order]


def test_deterministic_and_independent_of_question_subset(hotpot_file):
    data = load_hotpotqa(hotpot_file)
    full = build_ruler_hqa(data, 7)
    assert build_ruler_hqa(data, 7) == full
    assert build_ruler_hqa(data, 7, indices=[2, 0]) == [full[2], full[0]]
    # shuffle_seed=None: each question shuffled by its own generator, so own positions differ between questions.
    own = [r.own for r in build_ruler_hqa(data, 11, shuffle_seed=None)]
    assert len(set(own)) > 1 and own == [r.own for r in build_ruler_hqa(data, 11, shuffle_seed=None)]


def test_gold_documents_label_blocks(hotpot_file):
    rec = build_ruler_hqa(load_hotpotqa(hotpot_file), 7)[0]
    blocks = label_blocks(rec.context, rec.gold_spans(), WordTokenizer(), 6)
    # Word-level truth by counting: each document is its 2 header words ("Document", "i:") then its own words.
    gold_word = []
    for p, doc in enumerate(rec.documents):
        gold_word += [False, False] + [p in rec.gold] * len(doc.split())
    assert len(gold_word) == len(blocks.input_ids)
    assert blocks.related == tuple(any(gold_word[s:e]) for s, e in blocks.token_spans)
    assert sum(blocks.related) >= 2 and not all(blocks.related)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda r: r.pop("supporting_facts"), "missing field 'supporting_facts'"),
    (lambda r: r.pop("answer"), "missing field 'answer'"),
    (lambda r: r.__setitem__("question", "  "), "field 'question'"),
    (lambda r: r.__setitem__("answer", "The"), "field 'answer'"),
    (lambda r: r.__setitem__("context", [["Shared", "not a list"]]), r"field 'context'\[0\]"),
    (lambda r: r.__setitem__("context", []), "field 'context'"),
    (lambda r: r.__setitem__("supporting_facts", [["Nowhere", 0]]), "names the title 'Nowhere'"),
    (lambda r: r.__setitem__("supporting_facts", [["Delta", "0"]]), r"field 'supporting_facts'\[0\]"),
])
def test_malformed_records_name_the_record_and_field(tmp_path, mutate, fragment):
    recs = records()
    mutate(recs[1])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recs))
    with pytest.raises(HotpotQAFormatError, match=fragment) as info:
        load_hotpotqa(path)
    assert "record 1 (_id 'q1')" in str(info.value) and str(path) in str(info.value)


def test_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(HotpotQAFormatError, match="not valid JSON"):
        load_hotpotqa(bad)
    bad.write_text(json.dumps({"data": records()}))
    with pytest.raises(HotpotQAFormatError, match="JSON list"):
        load_hotpotqa(bad)
    with pytest.raises(HotpotQAFormatError, match="no records"):
        load_hotpotqa([])
    with pytest.raises(FileNotFoundError):
        load_hotpotqa(tmp_path / "missing.json")


def test_build_rejects_bad_arguments(hotpot_file):
    data = load_hotpotqa(hotpot_file)
    with pytest.raises(ValueError, match="exceeds the 11 unique paragraphs"):
        build_ruler_hqa(data, 12)
    with pytest.raises(ValueError, match="smaller than the 4 own paragraphs"):
        build_ruler_hqa(data, 3)
    with pytest.raises(ValueError, match="out of range"):
        build_ruler_hqa(data, 6, indices=[3])
    with pytest.raises(ValueError, match="repeated"):
        build_ruler_hqa(data, 6, indices=[0, 0])
    with pytest.raises(TypeError, match="num_docs"):
        build_ruler_hqa(data, "6")
    with pytest.raises(TypeError, match="load_hotpotqa"):
        build_ruler_hqa(records(), 6)


def test_write_read_round_trip_and_atomicity(hotpot_file, tmp_path):
    recs = build_ruler_hqa(load_hotpotqa(hotpot_file), 6)
    out = tmp_path / "eval_6.jsonl"
    assert write_ruler_hqa(out, recs) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {"context", "input", "answers", "num_docs", "index"} <= set(rows[0])  # MemAgent's keys
    assert rows[1]["input"] == "Question 1?" and rows[1]["answers"] == ["a book"] and rows[1]["num_docs"] == 6
    assert list(read_ruler_hqa(out)) == recs
    before = out.read_bytes()

    def failing():
        yield recs[0]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_ruler_hqa(out, failing())
    with pytest.raises(TypeError, match="item 1"):
        write_ruler_hqa(out, [recs[0], "not a record"])
    assert out.read_bytes() == before  # the earlier file survives both failures
    assert sorted(os.listdir(tmp_path)) == sorted(["eval_6.jsonl", hotpot_file.name])  # no temporary left
    with pytest.raises(FileNotFoundError):
        write_ruler_hqa(tmp_path / "no_such_dir" / "x.jsonl", recs)


def test_read_rejects_corrupt_lines(hotpot_file, tmp_path):
    recs = build_ruler_hqa(load_hotpotqa(hotpot_file), 6)
    row = recs[0].to_json()
    edited = copy.deepcopy(row)
    edited["context"] = edited["context"].replace("Document 2:", "Document 9:")
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(edited) + "\n")
    with pytest.raises(HotpotQAFormatError, match="line 2: 'context' does not match"):
        list(read_ruler_hqa(path))
    path.write_text(json.dumps(row) + "\n{oops\n")
    with pytest.raises(HotpotQAFormatError, match="line 2: not valid JSON"):
        list(read_ruler_hqa(path))
    del row["document_spans"]
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(HotpotQAFormatError, match="missing field 'document_spans'"):
        list(read_ruler_hqa(path))
    assert isinstance(recs[0], RulerHQARecord)
