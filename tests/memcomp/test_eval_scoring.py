"""memcomp.eval.scoring on hand-made cases: normalisation, EM, MemAgent's sub-EM, answer extraction, Wilson."""

import pytest

from memcomp.eval.scoring import (
    accuracy_interval,
    exact_match,
    extract_answer,
    extract_answer_with_source,
    normalize_answer,
    sub_em,
)


@pytest.mark.parametrize("text, expected", [
    ("The  U.S.A.!", "usa"),
    ("An apple a day", "apple day"),
    ("Theatre of the Absurd", "theatre of absurd"),  # articles only as whole words
    ("  Dolores\tPark,\nSF ", "dolores park sf"),
    ("A", ""),
    ("It's 1,024-tokens", "its 1024tokens"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_any_gold_after_normalisation():
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("yes", ["no", "YES."]) == 1.0
    assert exact_match("the", ["the beatles"]) == 0.0


@pytest.mark.parametrize("pred, golds, symmetric, expected", [
    ("It was Paris, France", ["Paris"], True, 1.0),  # gold inside the prediction
    ("It was Paris, France", ["Paris"], False, 1.0),
    ("Paris", ["Paris, France"], True, 1.0),  # prediction inside the gold: MemAgent counts it
    ("Paris", ["Paris, France"], False, 0.0),
    ("London", ["Paris"], True, 0.0),
    ("1945", ["1"], True, 1.0),  # character sub-strings, as MemAgent's `in`
    ("The Beatles", ["beatles"], True, 1.0),
    ("Lennon", ["John Lennon", "Paul McCartney"], False, 0.0),
    ("Sir Paul McCartney", ["John Lennon", "Paul McCartney"], False, 1.0),  # any gold counts
    ("the", ["the beatles"], True, 0.0),  # normalises to "": 0, not "contained in every gold"
    ("", ["Paris"], True, 0.0),
])
def test_sub_em_hand_cases(pred, golds, symmetric, expected):
    assert sub_em(pred, golds, symmetric=symmetric) == expected


def test_sub_em_is_memagents_formula_on_hand_cases():
    """MemAgent's sub_exact_match_score: normalised gold in prediction or prediction in gold (restated here from
    its definition); ours equals it wherever the normalised prediction is non-empty."""
    def memagent(pred, gold):
        p, g = normalize_answer(pred), normalize_answer(gold)
        return float(g in p or p in g)

    cases = [("in 1945", "1945"), ("Dolores Park", "sit in Dolores Park"), ("park", "Dolores Park"),
             ("an orange", "apple"), ("U.K.", "the UK"), ("Queen Elizabeth II", "Elizabeth")]
    for pred, gold in cases:
        assert sub_em(pred, [gold]) == memagent(pred, gold), (pred, gold)
    assert [sub_em(p, [g]) for p, g in cases] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_scores_reject_bad_input():
    with pytest.raises(TypeError, match="list of strings"):
        sub_em("Paris", "Paris")  # a bare str would make every character an answer
    with pytest.raises(ValueError, match="without gold answers"):
        exact_match("Paris", [])
    with pytest.raises(ValueError, match="empty after normalisation"):
        sub_em("Paris", ["The"])
    with pytest.raises(TypeError, match="extract_answer"):
        sub_em(None, ["Paris"])


@pytest.mark.parametrize("text, answer, source", [
    ("So the city is \\boxed{Paris}.", "Paris", "boxed"),
    ("First \\boxed{1}, finally \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed"),  # last one, nested braces
    ("\\boxed{\\text{New York}}", "New York", "boxed"),
    ("\\boxed{}", "", "boxed"),
    ("Answer: Paris\nBecause it is the capital.", "Paris", "answer"),
    ("Some reasoning.\nThe answer:\n\n   Lyon  \nmore text", "Lyon", "answer"),
    ("Answer: A. On reflection, final answer : B", "B", "answer"),  # the last cue
    ("It is \\boxed{Paris but the box never closes. Answer: Lyon", "Lyon", "answer"),  # unclosed box: no answer
    ("Answer:   \n  \n", "", "last_words"),  # a cue with nothing after it falls through
    ("", "", "last_words"),
])
def test_extract_answer_rules(text, answer, source):
    if source == "last_words" and text:
        answer = " ".join(text.split()[-20:])
    assert extract_answer_with_source(text) == (answer, source)
    assert extract_answer(text) == answer


def test_extract_answer_falls_back_to_the_last_20_words():
    words = [f"w{i}" for i in range(25)]
    assert extract_answer("  ".join(words[:12]) + "\n" + " ".join(words[12:])) == " ".join(words[5:])
    assert extract_answer("only three words") == "only three words"
    with pytest.raises(TypeError):
        extract_answer(None)


def test_accuracy_interval_wilson_values():
    mean, low, high = accuracy_interval([1] * 5 + [0] * 5)
    assert mean == 0.5 and low == pytest.approx(0.236593, abs=1e-6) and high == pytest.approx(0.763407, abs=1e-6)
    # At 0 / n and n / n the Wilson bounds have closed forms: z^2 / (n + z^2) and n / (n + z^2).
    z2 = 1.959963984540054 ** 2
    assert accuracy_interval([0] * 10) == (0.0, 0.0, pytest.approx(z2 / (10 + z2)))
    assert accuracy_interval([True] * 10) == (1.0, pytest.approx(10 / (10 + z2)), 1.0)
    mean, low, high = accuracy_interval([1.0, 0.0, 0.0])
    assert mean == pytest.approx(1 / 3) and low == pytest.approx(0.0614919, abs=1e-6)
    assert high == pytest.approx(0.7923404, abs=1e-6)
    # A wider quantile gives a wider interval around the same mean.
    _, low99, high99 = accuracy_interval([1, 0, 0], confidence_z=2.576)
    assert low99 < low and high99 > high


@pytest.mark.parametrize("hits, err", [([], ValueError), ([1, 0.5], ValueError), (["1"], TypeError),
                                       ("1010", TypeError), ([2], ValueError)])
def test_accuracy_interval_rejects_bad_scores(hits, err):
    with pytest.raises(err):
        accuracy_interval(hits)
