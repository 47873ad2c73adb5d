"""memcomp.rl.rewards: \\boxed{} extraction, SQuAD normalisation, the rule reward, DAPO's overlong shaping."""

import pytest

from memcomp.rl.rewards import extract_boxed, normalize_answer, overlong_shaping, rule_reward, validate_gold_answers


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{Paris}.", "Paris"),
    ("first \\boxed{1}, then corrected: \\boxed{2}", "2"),                      # the LAST one
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                                  # nested braces
    ("\\boxed{ {a}{b} } tail", "{a}{b}"),                                       # stripped, nesting kept
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),                                      # escaped braces are literals
    ("\\boxed {x}", "x"),                                                       # space before the brace
    ("\\fbox{y}", "y"),
    ("\\boxed{}", ""),
    ("no box here", None),
    ("\\boxed{done} and then \\boxed{trunc", None),                            # last one unclosed: truncated
    ("\\boxed{a{b}", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_rejects_non_str():
    with pytest.raises(TypeError, match="expects a str"):
        extract_boxed(None)


@pytest.mark.parametrize("text, expected", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("an apple, a pear and THE plum", "apple pear and plum"),
    ("U.S.A.", "usa"),
    ("  the  ", ""),
    ("Theatre", "theatre"),                                                     # articles only as whole words
    ("1,000 m", "1000 m"),
])
def test_normalize_answer_is_squads_rule(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("response, golds, mode, expected", [
    ("... \\boxed{The Eiffel Tower.}", ["eiffel tower"], "em", 1.0),
    ("... \\boxed{Eiffel}", ["eiffel tower"], "em", 0.0),
    ("... \\boxed{Eiffel}", ["eiffel tower"], "sub_em", 1.0),                  # prediction inside gold
    ("... \\boxed{the Eiffel Tower in Paris}", ["Eiffel Tower"], "sub_em", 1.0),  # gold inside prediction
    ("... \\boxed{London}", ["Paris", "London"], "em", 1.0),                   # ANY gold answer
    ("... \\boxed{Rome}", ["Paris", "London"], "sub_em", 0.0),
    ("... \\boxed{\\text{Paris}}", ["paris"], "em", 1.0),                      # LaTeX text wrapper unwrapped
    ("Paris", ["Paris"], "em", 0.0),                                           # no box: no answer
    ("... \\boxed{Paris", ["Paris"], "sub_em", 0.0),                           # truncated box
    ("... \\boxed{}", ["Paris"], "sub_em", 0.0),                               # empty is not "contained" in gold
    ("... \\boxed{.!}", ["Paris"], "sub_em", 0.0),                            # normalises to nothing
])
def test_rule_reward(response, golds, mode, expected):
    assert rule_reward(response, golds, mode=mode) == expected


def test_rule_reward_rejects_bad_records():
    with pytest.raises(ValueError, match="without gold answers"):
        rule_reward("\\boxed{x}", [])
    with pytest.raises(TypeError, match="list of strings"):
        rule_reward("\\boxed{x}", "x")                                         # a bare str: every char an answer
    with pytest.raises(TypeError, match="must be strings"):
        rule_reward("\\boxed{x}", ["x", 3])
    with pytest.raises(ValueError, match="empty after normalisation"):
        rule_reward("\\boxed{x}", ["x", "The."])
    with pytest.raises(ValueError, match="mode"):
        rule_reward("\\boxed{x}", ["x"], mode="f1")
    with pytest.raises(TypeError, match="response"):
        rule_reward(None, ["x"])
    with pytest.raises(ValueError, match="empty after normalisation"):
        validate_gold_answers(["x", "  "])
    assert validate_gold_answers(("The Cat", "\\text{dog}!")) == ["cat", "dog"]


@pytest.mark.parametrize("length, expected", [
    (0, 0.0), (499, 0.0), (500, 0.0),            # 0 up to l_max - buffer
    (501, -0.005), (550, -0.25), (575, -0.375),  # the linear ramp
    (600, -0.5),                                 # -factor at l_max
    (601, -0.5), (5000, -0.5),                   # longer than l_max: -factor, never below
])
def test_overlong_shaping_values_of_the_paper(length, expected):
    assert overlong_shaping(length) == pytest.approx(expected, abs=1e-12)


def test_overlong_shaping_other_settings_and_bad_input():
    assert overlong_shaping(90, l_max=100, buffer=20, factor=1.0) == pytest.approx(-0.5)
    assert overlong_shaping(100, l_max=100, buffer=100, factor=1.0) == pytest.approx(-1.0)
    assert overlong_shaping(1, l_max=100, buffer=100, factor=1.0) == pytest.approx(-0.01)
    for kwargs, err in [({"length": -1}, ValueError), ({"length": 3.0}, TypeError), ({"length": True}, TypeError),
                        ({"length": 5, "buffer": 0}, ValueError),
                        ({"length": 5, "l_max": 50, "buffer": 60}, ValueError),
                        ({"length": 5, "factor": -0.1}, ValueError)]:
        with pytest.raises(err):
            overlong_shaping(**kwargs)


def test_plain_reward_reads_the_answer_before_a_text_end_marker_even_when_cut_short():
    """Unboxed answers (the demo's tokenizer spells ChatML's end marker as 7 text tokens): the answer ends where
    the marker begins, also when a token budget cut the marker short; a "<" that starts no marker is kept."""
    from memcomp.rl.rollout import plain_reward, strip_end_marker

    assert strip_end_marker("Decode<|im") == "Decode" and strip_end_marker("the<|im_end|>\n<|im") == "the"
    assert strip_end_marker("a <") == "a " and strip_end_marker("x<y") == "x<y"
    assert strip_end_marker("<https://json.org> z") == "<https://json.org> z"
    assert plain_reward("Decode<|im", ["Decode"], "exact") == 1.0
    assert plain_reward("Decode<|im_end|>", ["Decode"], "em") == 1.0
    assert plain_reward("Decoder<|im", ["Decode"], "exact") == 0.0
    assert plain_reward("<https://json.org>", ["<https://json.org>"], "exact") == 1.0
    assert plain_reward("<|im_end|>", ["x"], "exact") == 0.0
