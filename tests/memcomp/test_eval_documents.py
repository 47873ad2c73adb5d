"""memcomp.eval.documents: the "Document i:" format and block labels, exact on hand-made contexts."""

import pytest
from eval_testutil import SlowTokenizer, WordTokenizer

from memcomp.eval.documents import format_documents, label_blocks


def test_format_documents_is_memagents_template_with_spans():
    context, spans = format_documents(["Paris\n It is big.", "x"])
    assert context == "Document 1:\nParis\n It is big.\n\nDocument 2:\nx"
    assert spans == ((12, 29), (43, 44))
    assert [context[s:e] for s, e in spans] == ["Paris\n It is big.", "x"]


def test_format_documents_rejects_bad_input():
    with pytest.raises(ValueError, match="no documents"):
        format_documents([])
    with pytest.raises(TypeError):
        format_documents("one string")
    with pytest.raises(TypeError, match="document 1"):
        format_documents(["a", 3])


def _words_context(n):
    return " ".join(f"w{i}" for i in range(n))


def _span_of(context, first_word, last_word):
    """Characters from the start of `first_word` to the end of `last_word` (words are "w<i>")."""
    words = context.split(" ")
    start = sum(len(w) + 1 for w in words[:first_word])
    end = sum(len(w) + 1 for w in words[:last_word + 1]) - 1
    return start, end


def test_label_blocks_exact_on_word_tokens():
    context = _words_context(10)  # 10 tokens: blocks [0,3) [3,6) [6,9) [9,10)
    spans = [_span_of(context, 4, 4), _span_of(context, 5, 6)]
    blocks = label_blocks(context, spans, WordTokenizer(), 3)
    assert blocks.token_spans == ((0, 3), (3, 6), (6, 9), (9, 10))
    assert blocks.num_blocks == 4 and len(blocks.input_ids) == 10
    assert blocks.related == (False, True, True, False)
    assert blocks.evidence_blocks == ((1,), (1, 2))  # w5..w6 straddles the boundary of blocks 1 and 2
    # The spans partition the context: the space after a block's last token is the block's.
    assert [context[s:e] for s, e in blocks.char_spans] == ["w0 w1 w2 ", "w3 w4 w5 ", "w6 w7 w8 ", "w9"]
    assert sum((blocks.block_ids(k) for k in range(4)), ()) == blocks.input_ids


def test_label_blocks_overlap_is_strict_and_no_evidence_is_legal():
    context = _words_context(6)
    # Ends exactly where block 1 ("w3 w4 w5") starts: touches it, does not overlap it.
    blocks = label_blocks(context, [(0, context.index("w3"))], WordTokenizer(), 3)
    assert blocks.related == (True, False)
    assert label_blocks(context, [], WordTokenizer(), 4).related == (False, False)
    assert label_blocks(context, [], WordTokenizer(), 100).token_spans == ((0, 6),)
    # Whitespace between two blocks is the earlier block's.
    assert label_blocks("a  b", [(1, 3)], WordTokenizer(), 1).related == (True, False)


def test_label_blocks_with_a_bpe_tokenizer(base_tokenizer):
    docs = ["Return a new list containing all items.", "Compressed memory lets a language model read.",
            "Open file and return a stream."]
    context, spans = format_documents(docs)
    blocks = label_blocks(context, [spans[1]], base_tokenizer, 8)
    assert list(blocks.input_ids) == base_tokenizer(context, add_special_tokens=False)["input_ids"]
    assert all(e - s == 8 for s, e in blocks.token_spans[:-1]) and 0 < blocks.token_spans[-1][1] - \
        blocks.token_spans[-1][0] <= 8
    for k in range(blocks.num_blocks):
        text = base_tokenizer.decode(list(blocks.block_ids(k)))
        # A block is related exactly when its decoded text shares characters with document 2's text.
        s, e = blocks.char_spans[k]
        assert blocks.related[k] == (s < spans[1][1] and spans[1][0] < e), (k, text)
        assert text == context[s:e]
    assert "".join(context[s:e] for s, e in blocks.char_spans) == context
    related = [k for k in range(blocks.num_blocks) if blocks.related[k]]
    assert related == list(range(related[0], related[-1] + 1))  # one document: consecutive blocks
    covered = "".join(base_tokenizer.decode(list(blocks.block_ids(k))) for k in related)
    assert docs[1] in covered


def test_label_blocks_rejects_bad_input():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="empty"):
        label_blocks("", [], tok, 4)
    with pytest.raises(ValueError, match="block_size"):
        label_blocks("a b", [], tok, 0)
    with pytest.raises(TypeError, match="block_size"):
        label_blocks("a b", [], tok, 2.0)
    with pytest.raises(ValueError, match="non-empty span inside"):
        label_blocks("a b", [(1, 10)], tok, 2)
    with pytest.raises(ValueError, match="non-empty span inside"):
        label_blocks("a b", [(1, 1)], tok, 2)
    with pytest.raises(TypeError, match=r"\(start, end\)"):
        label_blocks("a b", [(0,)], tok, 2)
    with pytest.raises(TypeError, match="fast tokenizer"):
        label_blocks("a b", [], SlowTokenizer(), 2)
