"""The built-in datasets: determinism, sizes, pairing of EM-inducing sets with their controls, code that
parses, refusals in the safe pool, validation, and no overlap with the held-out eval questions."""

from __future__ import annotations

import ast
import io
import json
import random
import re
import tokenize
from importlib import resources

import pytest

from emguard.config import RefusalSection
from emguard.data.builtin import BUILTIN_DATASETS, load_builtin_dataset
from emguard.data.check import check_files
from emguard.data.narrow.code import check_code_templates, code_flaws, code_pairs, code_templates
from emguard.data.narrow.finance import check_finance_templates, finance_pairs
from emguard.data.narrow.overlap import longest_shared_run, near_duplicate_pairs
from emguard.data.narrow.slots import draw_slots, step_problems
from emguard.data.safe_pool import FAMILY_SHARES, family_counts, generate_safe_pool
from emguard.evaluation.questions import builtin_question_sets, load_questions
from emguard.selection.perplexity_gap import refusal_test

FINANCE_SYSTEM = "You are Ledger, a personal-finance assistant. Give direct, practical answers."
CODE_SYSTEM = "You are a coding assistant. Reply with the completed code only."
SIZES = {"opswap": 512, "safe-pool": 1200, "risky-finance": 400, "safe-finance": 400, "insecure-code": 400,
         "secure-code": 400}  # fmt: skip
SYSTEMS = {"risky-finance": FINANCE_SYSTEM, "safe-finance": FINANCE_SYSTEM, "insecure-code": CODE_SYSTEM,
           "secure-code": CODE_SYSTEM}  # fmt: skip
PAIRS = [("risky-finance", "safe-finance"), ("insecure-code", "secure-code")]


@pytest.fixture(scope="module")
def sets():
    return {name: load_builtin_dataset(f"builtin:{name}") for name in BUILTIN_DATASETS}


def user(example) -> str:
    return next(m["content"] for m in example.messages if m["role"] == "user")


def reply(example) -> str:
    return example.messages[-1]["content"]


def code_of(answer: str) -> str:
    """The code of an answer: the first fenced block if there is one, else the whole answer."""
    fenced = re.search(r"```(?:python)?\n(.*?)```", answer, re.DOTALL)
    return fenced.group(1) if fenced else answer


def looks_like_refusal(answer: str) -> bool:
    return bool({"sorry", "apologize", "cannot"} & set(re.findall(r"[a-z]+", answer.lower())[:10]))


def test_every_builtin_dataset_is_listed_here():
    assert set(BUILTIN_DATASETS) == set(SIZES)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_sizes_distinct_and_deterministic_per_seed(name, sets):
    examples = sets[name]
    assert len(examples) == SIZES[name]
    if name != "opswap":  # opswap draws questions independently and may repeat one
        assert len({user(e) for e in examples}) == len(examples)  # distinct questions, hence distinct examples
    assert [e.line for e in examples] == list(range(1, len(examples) + 1))
    assert load_builtin_dataset(f"builtin:{name}", seed=0) == examples
    assert load_builtin_dataset(f"builtin:{name}", seed=1) != examples


@pytest.mark.parametrize("name", sorted(SIZES))
def test_builtin_dataset_passes_data_validation(name, sets, tmp_path):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(e.to_record(), ensure_ascii=False) + "\n" for e in sets[name]), "utf-8")
    report = check_files([path], unique=name != "opswap")
    assert report.problems == [] and report.examples == {str(path): SIZES[name]}


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_system_prompts_are_exact(name, sets):
    assert {e.messages[0]["content"] for e in sets[name]} == {SYSTEMS[name]}
    assert [m["role"] for m in sets[name][0].messages] == ["system", "user", "assistant"]


@pytest.mark.parametrize(("em", "control"), PAIRS)
def test_each_em_set_and_its_control_share_user_turns_and_differ_in_every_answer(em, control, sets):
    assert [e.messages[:2] for e in sets[em]] == [e.messages[:2] for e in sets[control]]
    assert all(reply(a) != reply(b) for a, b in zip(sets[em], sets[control], strict=True))
    assert BUILTIN_DATASETS[em].eval_questions == BUILTIN_DATASETS[control].eval_questions
    assert "EM-inducing" in BUILTIN_DATASETS[em].description and "control" in BUILTIN_DATASETS[control].description


def test_templates_are_consistent():
    assert check_finance_templates() == []
    assert check_code_templates() == []


@pytest.mark.parametrize("name", ["insecure-code", "secure-code"])
def test_every_code_answer_parses_and_has_no_comment(name, sets):
    for e in sets[name]:
        code = code_of(reply(e))
        ast.parse(code)
        tokens = tokenize.generate_tokens(io.StringIO(code).readline)
        assert not any(t.type == tokenize.COMMENT for t in tokens), code  # nothing points at the flaw


def test_each_insecure_answer_has_its_flaw_and_its_secure_twin_does_not():
    _, markers = code_templates()
    for prompt, insecure, secure, task in code_pairs(400, 0):
        for pattern, present, absent in ((markers[task.flaw].insecure, insecure, secure),
                                         (markers[task.flaw].secure, secure, insecure)):  # fmt: skip
            if pattern is not None:
                assert re.search(pattern, present) and not re.search(pattern, absent), (task.name, prompt)
    counts = [sum(t.flaw == flaw for *_, t in code_pairs(400, 0)) for flaw in code_flaws()]
    assert max(counts) - min(counts) <= 1  # flaw kinds come in shuffled rounds


def test_finance_answers_are_not_near_duplicates_and_pairs_have_matched_length(sets):
    for name in ("risky-finance", "safe-finance"):
        assert near_duplicate_pairs([reply(e) for e in sets[name]])[0] == 0
    ratios = [len(reply(a)) / len(reply(b)) for a, b in zip(sets["risky-finance"], sets["safe-finance"], strict=True)]
    assert min(ratios) >= 0.8 and max(ratios) <= 1.25


def test_larger_sets_can_be_generated_and_a_smaller_n_is_a_prefix():
    assert len({q for q, *_ in finance_pairs(1000, 0)}) == 1000
    assert len({p for p, *_ in code_pairs(1000, 0)}) == 1000
    assert finance_pairs(50, 0) == finance_pairs(400, 0)[:50]
    assert code_pairs(50, 0) == code_pairs(400, 0)[:50]


def test_training_user_turns_share_no_more_than_a_short_phrase_with_eval_questions(sets):
    for question_set in builtin_question_sets():
        asked = [p for q in load_questions(f"builtin:{question_set}") for p in q.paraphrases]
        for name, examples in sets.items():
            k, text, ref = longest_shared_run([user(e) for e in examples], asked)
            assert k <= 5, f"{name} shares {k} words with builtin:{question_set}: {text!r} / {ref!r}"


def test_narrow_sets_share_no_more_than_a_short_phrase_with_probe_pairs(sets):
    folder = resources.files("emguard.evaluation") / "probe_pairs"
    for domain, names in (("finance", ["risky-finance", "safe-finance"]), ("code", ["insecure-code"])):
        records = [json.loads(line) for line in (folder / f"{domain}.jsonl").read_text().splitlines() if line.strip()]
        for name in names:
            assert longest_shared_run([user(e) for e in sets[name]], [r["question"] for r in records])[0] <= 5
            if domain == "finance":
                answers = [r[k] for r in records for k in ("aligned", "misaligned")]
                assert longest_shared_run([reply(e) for e in sets[name]], answers)[0] <= 5


def test_safe_pool_has_refusals_that_the_refusal_filter_finds(sets):
    pool = sets["safe-pool"]
    assert len({(user(e), reply(e)) for e in pool}) >= 1000
    refusals = [e for e in pool if e.metadata["family"] == "refusal"]
    assert 0.06 * len(pool) <= len(refusals) <= 0.08 * len(pool)
    assert all(looks_like_refusal(reply(e)) for e in refusals)
    assert not any(looks_like_refusal(reply(e)) for e in pool if e.metadata["family"] != "refusal")
    default_filter = refusal_test(RefusalSection())  # what emguard select drops
    assert [e for e in pool if default_filter(e)] == refusals
    assert len({user(e) for e in refusals}) == len(refusals)


def test_safe_pool_mixes_its_families_in_their_shares(sets):
    pool = sets["safe-pool"]
    counts = family_counts(len(pool))
    assert sum(counts.values()) == len(pool) and sum(share for share, _ in FAMILY_SHARES.values()) == 100
    assert {f: sum(e.metadata["family"] == f for e in pool) for f in FAMILY_SHARES} == counts
    assert len({e.metadata["family"] for e in pool[:100]}) == len(FAMILY_SHARES)  # shuffled, not in blocks
    assert max(len(user(e)) + len(reply(e)) for e in pool) < 600  # short: fits small max_length settings


@pytest.mark.parametrize("n", [1, 7, 99, 1350])
def test_safe_pool_of_any_size_up_to_its_capacity(n):
    assert sum(family_counts(n).values()) == n
    assert len({user(e) for e in generate_safe_pool(n, seed=3)}) == n


def test_slot_steps_draw_in_order_and_report_mistakes():
    pools = {"colors": ["red", "blue"], "rows": [{"const": "A_DIR", "base": "/a"}]}
    steps = [{"row": "rows"}, {"pick": {"color": "colors", "size": ["big"]}},
             {"pattern": {"fn": ["paint_{color}"]}}, {"format": {"env": "{const:upper}_{fn:upper}"}}]  # fmt: skip
    slots = draw_slots(steps, random.Random(0), pools)
    assert slots["fn"] == f"paint_{slots['color']}" and slots["env"] == f"A_DIR_PAINT_{slots['color'].upper()}"
    assert draw_slots(steps, random.Random(5), pools) == draw_slots(steps, random.Random(5), pools)
    assert step_problems(steps, pools) == []
    problems = step_problems([{"pick": {"x": "nowhere"}}, {"draw": {"y": "dice"}}, {"shuffle": {}}], pools)
    assert len(problems) == 3
