"""Helpers for the tests of memcomp.eval."""

import re


class WordTokenizer:
    """A Hugging Face-style tokenizer whose tokens are the runs of non-whitespace characters, with character
    offsets: token counts and positions are countable by hand, so expected blocks and lengths can be written
    down exactly. Ids are assigned on first sight."""

    is_fast = True

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        ids = [self.vocab.setdefault(text[s:e], len(self.vocab)) for s, e in spans]
        out = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out


class SlowTokenizer:
    """What transformers' Python (slow) tokenizers do when asked for offsets."""

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return {"input_ids": [0] * len(text.split())}


class JoinTokenizer(WordTokenizer):
    """WordTokenizer plus one extra token wherever a capitalised word follows a sentence end: a stand-in for BPE
    merges at joins, where a text's token count is not the sum of its parts' counts."""

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        out = super().__call__(text, add_special_tokens, True)
        ids, offsets = [], []
        for k, (tid, (s, e)) in enumerate(zip(out["input_ids"], out["offset_mapping"])):
            if k and text[s].isupper() and text[out["offset_mapping"][k - 1][1] - 1] == ".":
                ids.append(self.vocab.setdefault("<join>", len(self.vocab)))
                offsets.append((s, e))
            ids.append(tid)
            offsets.append((s, e))
        out = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out
