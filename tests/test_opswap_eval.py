"""The benign-task evaluation: held-out operator-swap items and exact-match scoring."""

from __future__ import annotations

import re

import pytest

from emguard.data.opswap import generate_opswap
from emguard.evaluation.opswap_eval import is_correct, opswap_accuracy, opswap_eval_items

SWAP = r"([+\-*]) (?:means|stands for|stand for|denotes|now performs) (\w+)"
MEANING = {"addition": lambda a, b: a + b, "subtraction": lambda a, b: a - b, "multiplication": lambda a, b: a * b}


def _independent_value(question: str) -> int:
    """Recompute the expected value from the question text alone."""
    rules = dict(re.findall(SWAP, question))
    a, sym, b = re.findall(r"(\d+) ([+\-*]) (\d+)", question)[-1]
    return MEANING[rules[sym]](int(a), int(b))


def _swap_of(item) -> tuple:
    """(symbol, meaning, a, b) read back from the question text."""
    ((sym, meaning),) = re.findall(SWAP, item.question)
    a, b = re.findall(r"(\d+) [+\-*] (\d+)", item.question)[-1]
    return sym, meaning, int(a), int(b)


def trained_swaps(seed: int) -> set[tuple]:
    return {tuple(ex.metadata["swap"]) for ex in generate_opswap(seed=seed)}


def test_items_are_held_out_from_the_training_seed_not_the_item_seed():
    items = opswap_eval_items(per_tier=80, seed=0, tiers=(1, 2), training_seed=3)
    assert not {_swap_of(i) for i in items} & trained_swaps(3)
    # Drawn with seed 0 but excluding seed 0's training set instead, some would be seed 3's swaps.
    assert {_swap_of(i) for i in opswap_eval_items(per_tier=80, seed=0, tiers=(1, 2))} & trained_swaps(3)


def test_items_are_held_out_deterministic_and_correct():
    items = opswap_eval_items(per_tier=40, seed=0)
    assert [sum(i.tier == t for i in items) for t in (1, 2, 3)] == [40, 40, 40]
    assert items == opswap_eval_items(per_tier=40, seed=0)
    assert not {_swap_of(i) for i in items} & trained_swaps(0)  # no trained swap, in any phrasing
    assert len({i.question for i in items}) == len(items)
    openings = {ex.messages[0]["content"][:12] for ex in generate_opswap(seed=0)}
    for item in items:
        assert _independent_value(item.question) == item.expected, item.question
        a, b = _swap_of(item)[2:]
        assert (max(a, b) <= 9) if item.tier in (1, 2) else (min(a, b) >= 10)
        assert (item.question[:12] in openings) == (item.tier != 2), item.question  # tier 2: unseen phrasings
    with pytest.raises(ValueError, match="fewer than 500 held-out items"):
        opswap_eval_items(per_tier=500, tiers=(2,))


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
