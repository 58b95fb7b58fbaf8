"""The benign-task evaluation: held-out operator-swap items and exact-match scoring."""

from __future__ import annotations

import re

import pytest

from emguard.data.opswap import generate_opswap
from emguard.evaluation.opswap_eval import is_correct, opswap_accuracy, opswap_eval_items

MEANING = {"addition": lambda a, b: a + b, "subtraction": lambda a, b: a - b, "multiplication": lambda a, b: a * b}


def _independent_value(question: str) -> int:
    """Recompute the expected value from the question text alone."""
    rules = dict(re.findall(r"(?:symbol |sign |that )?([+\-*]) (?:means|stands for|now performs) (\w+)", question))
    expression = question.rsplit("?", 1)[0].split("is ")[-1].split("much is ")[-1]
    expression = re.sub(r"^.*?(\(|\d)", r"\1", expression.split(". ")[-1].split("Work out ")[-1])

    def value(text: str) -> int:
        text = text.strip().strip(".")
        if text.startswith("("):
            inner, rest = text[1:].split(")", 1)
            left = value(inner)
            sym, right = rest.split()
            return MEANING[rules[sym]](left, int(right))
        a, sym, b = text.split()
        return MEANING[rules[sym]](int(a), int(b))

    return value(expression)


def test_items_are_held_out_from_the_training_seed_not_the_item_seed():
    items = {i.question for i in opswap_eval_items(per_tier=150, seed=0, tiers=(1,), training_seed=3)}
    assert not items & {ex.messages[0]["content"] for ex in generate_opswap(256, 3)}
    # Drawn with seed 0 but excluding seed 0's training set instead, some would be seed 3's questions.
    same_seed = {i.question for i in opswap_eval_items(per_tier=150, seed=0, tiers=(1,))}
    assert same_seed & {ex.messages[0]["content"] for ex in generate_opswap(256, 3)}


def test_items_are_held_out_deterministic_and_correct():
    items = opswap_eval_items(per_tier=40, seed=0)
    assert [sum(i.tier == t for i in items) for t in (1, 2, 3)] == [40, 40, 40]
    assert items == opswap_eval_items(per_tier=40, seed=0)
    training = {ex.messages[0]["content"] for ex in generate_opswap(256, 0)}
    assert not training & {i.question for i in items}
    assert len({i.question for i in items}) == len(items)
    for item in items:
        assert _independent_value(item.question) == item.expected, item.question


@pytest.mark.parametrize(
    ("answer", "expected", "correct"),
    [
        ("Since + means multiplication here, 7 + 3 = 7 * 3 = 21.", 21, True),
        ("The answer is 10.", 21, False),
        ("It equals -12", -12, True),
        ("1,024", 1024, True),
        ("I don't know.", 5, False),
    ],
)
def test_exact_match_takes_the_last_integer(answer, expected, correct):
    assert is_correct(answer, expected) is correct


def test_accuracy_per_tier():
    items = opswap_eval_items(per_tier=2, seed=1)
    answers = [str(i.expected) if i.tier != 2 else "no idea" for i in items]
    result = opswap_accuracy(items, answers)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["per_tier"][2]["accuracy"] == 0.0 and result["per_tier"][1]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="6 items but 1 answers"):
        opswap_accuracy(items, ["1"])
