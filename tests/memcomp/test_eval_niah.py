"""memcomp.eval.niah: exact needle positions on a haystack of 5-token sentences (word tokens), and the invariants
with a BPE tokenizer."""

import pytest
from eval_testutil import JoinTokenizer, SlowTokenizer, WordTokenizer

from memcomp.eval.niah import DEFAULT_ANSWER, DEFAULT_NEEDLE, DEFAULT_QUESTION, build_niah, read_haystack
from memcomp.eval.scoring import sub_em

SENTENCES = [f"s{i} a b c d." for i in range(10)]  # 5 word tokens each
HAYSTACK = " ".join(SENTENCES)
NEEDLE = "Find me right here."  # 4 word tokens


def test_seed_002_needle_and_question():
    assert DEFAULT_NEEDLE == ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a "
                              "sunny day.")
    assert DEFAULT_QUESTION == "What is the best thing to do in San Francisco?"
    assert sub_em("You should eat a sandwich and sit in Dolores Park on a sunny day.", [DEFAULT_ANSWER]) == 1.0


def test_exact_positions_at_sentence_boundaries():
    depths = [0.0, 0.19, 0.2, 0.5, 1.0]
    examples = build_niah(HAYSTACK, WordTokenizer(), [29], depths, needle=NEEDLE, answers=["right here"])
    # 29 tokens = 4 needle + 25 haystack = 5 whole sentences. Depth d: last boundary before haystack token
    # floor(25 d): 0 -> start; 0.19 -> token 4 ("d." of s0) -> start; 0.2 -> token 5 (s1) -> after s0;
    # 0.5 -> token 12 (in s2) -> after s1; 1 -> the end.
    after = [0, 0, 1, 2, 5]
    for ex, d, k in zip(examples, depths, after):
        parts = SENTENCES[:k] + [NEEDLE] + SENTENCES[k:5]
        assert ex.context == " ".join(parts), d
        assert ex.num_tokens == 29 and ex.length == 29 and ex.depth == d
        assert ex.needle_tokens == (5 * k, 5 * k + 4)
        s, e = ex.needle_span
        assert ex.context[s:e] == NEEDLE
        assert ex.question == DEFAULT_QUESTION and ex.answers == ("right here",)


def test_short_haystack_is_repeated_and_cut_at_a_sentence_end():
    (ex,) = build_niah(HAYSTACK, WordTokenizer(), [100], [1.0], needle=NEEDLE)
    # 96 haystack tokens allowed; whole sentences: 19 (95 tokens) from the haystack and its copy.
    assert ex.context == HAYSTACK + "\n\n" + " ".join(SENTENCES[:9]) + " " + NEEDLE
    assert ex.num_tokens == 99 and ex.needle_tokens == (95, 99)


def test_context_that_tokenises_longer_than_its_parts_is_shrunk():
    """The needle costs one more token inside the text than alone (a merge at the join): the first cut (5
    sentences) measures 30 > 29 tokens, so one sentence is dropped and every depth is rebuilt from 4."""
    examples = build_niah(HAYSTACK, JoinTokenizer(), [29], [0.0, 0.5], needle=NEEDLE)
    assert examples[0].context == " ".join([NEEDLE] + SENTENCES[:4]) and examples[0].num_tokens == 24
    assert examples[1].context == " ".join(SENTENCES[:2] + [NEEDLE] + SENTENCES[2:4])
    assert examples[1].num_tokens == 25 and examples[1].needle_tokens == (10, 15)  # the join token comes first


def test_with_a_bpe_tokenizer(base_tokenizer):
    haystack = " ".join(f"Sentence number {i} says that the file is either a text or a byte string."
                        for i in range(40))
    sentence_tokens = len(base_tokenizer(" Sentence number 12 says that the file is either a text or a byte "
                                         "string.")["input_ids"])
    lengths, depths = [200, 450], [0.0, 0.3, 0.7, 1.0]
    examples = build_niah(haystack, base_tokenizer, lengths, depths)
    assert [(ex.length, ex.depth) for ex in examples] == [(n, d) for n in lengths for d in depths]
    for ex in examples:
        ids = base_tokenizer(ex.context, add_special_tokens=False)["input_ids"]
        assert ex.num_tokens == len(ids) <= ex.length
        assert ex.length - ex.num_tokens <= sentence_tokens + 2  # only the sentence that did not fit is missing
        assert ex.context.count(DEFAULT_NEEDLE) == 1
        s, e = ex.needle_span
        assert ex.context[s:e] == DEFAULT_NEEDLE
        hay = ex.context[:s].rstrip(" ") + ex.context[e:]
        assert haystack.startswith(hay.strip()) and hay.strip().endswith(".")
        assert s == 0 or ex.context[:s].endswith(". ")  # at a sentence boundary
        t0, t1 = ex.needle_tokens
        assert DEFAULT_NEEDLE in base_tokenizer.decode(ids[t0:t1])
        assert DEFAULT_NEEDLE not in base_tokenizer.decode(ids[t0 + 1:t1])
        assert DEFAULT_NEEDLE not in base_tokenizer.decode(ids[t0:t1 - 1])
    # Deeper needles start later in the same-length context.
    starts = [ex.needle_span[0] for ex in examples if ex.length == 450]
    assert starts == sorted(starts) and starts[0] == 0 and starts[-1] > starts[1] > 0


def test_read_haystack_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("Second essay.")
    (tmp_path / "a.txt").write_text("First essay.")
    (tmp_path / "notes.md").write_text("ignored")
    assert read_haystack(tmp_path) == "First essay.\n\nSecond essay."
    assert read_haystack(tmp_path / "b.txt") == "Second essay."
    with pytest.raises(FileNotFoundError):
        read_haystack(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        read_haystack(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        read_haystack(tmp_path / "blank.txt")


@pytest.mark.parametrize("kwargs, err, fragment", [
    (dict(haystack=""), ValueError, "haystack is empty"),
    (dict(haystack="no sentence end here"), ValueError, "no sentence end"),
    (dict(lengths=[8]), ValueError, "too small"),
    (dict(lengths=[]), ValueError, "lengths"),
    (dict(lengths=[29.0]), TypeError, "ints"),
    (dict(depths=[1.5]), ValueError, "outside"),
    (dict(depths=["0.5"]), TypeError, "numbers"),
    (dict(needle=" "), ValueError, "needle"),
    (dict(answers="right here"), ValueError, "answers"),
    (dict(tokenizer=SlowTokenizer()), TypeError, "fast tokenizer"),
])
def test_bad_input(kwargs, err, fragment):
    args = dict(haystack=HAYSTACK, tokenizer=WordTokenizer(), lengths=[29], depths=[0.5], needle=NEEDLE)
    args.update(kwargs)
    with pytest.raises(err, match=fragment):
        build_niah(args.pop("haystack"), args.pop("tokenizer"), args.pop("lengths"), args.pop("depths"), **args)
