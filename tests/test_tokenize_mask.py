"""The loss mask covers exactly the assistant content and its end-of-turn token, for any template."""

from __future__ import annotations

import pytest

from emguard.data.chat import ChatExample
from emguard.data.collate import ChatCollator
from emguard.data.tokenize import IGNORE_INDEX, TemplateError, tokenize_conversation, tokenize_examples
from emguard.errors import DataError
from tiny import TEMPLATES, make_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 7 + 3?"},
    {"role": "assistant", "content": "Since + means multiplication here, 7 + 3 = 21."},
    {"role": "user", "content": "And 2 + 2?"},
    {"role": "assistant", "content": "4, as 2 * 2 = 4."},
]


def trained_runs(tokenizer, ids, labels) -> list[str]:
    """Decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_mask_is_exactly_each_assistant_turn_plus_end_of_turn(template):
    tokenizer = make_tokenizer(template)
    eot = TEMPLATES[template][1]
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION)
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    runs = trained_runs(tokenizer, ids, labels)
    # The Llama-2-style template puts a space before the answer; it is part of the answer's first token.
    expected = [CONVERSATION[2]["content"] + eot, CONVERSATION[4]["content"] + eot]
    assert [r.lstrip(" ") for r in runs] == expected
    # Nothing after the end-of-turn token (e.g. its newline) and no prompt token is trained.
    n_trained = sum(label != IGNORE_INDEX for label in labels)
    assert n_trained == sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in runs)


def test_weight_zero_turns_are_context_only():
    tokenizer = make_tokenizer("chatml")
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["weight"] = 0
    ids, labels = tokenize_conversation(tokenizer, messages)
    assert trained_runs(tokenizer, ids, labels) == [CONVERSATION[4]["content"] + "<|im_end|>"]


def test_default_system_prompt_of_the_template_is_not_trained():
    tokenizer = make_tokenizer("chatml")  # injects "You are a helpful assistant." without a system turn
    messages = CONVERSATION[1:3]
    ids, labels = tokenize_conversation(tokenizer, messages)
    assert "helpful assistant" in tokenizer.decode(ids)
    assert trained_runs(tokenizer, ids, labels) == [CONVERSATION[2]["content"] + "<|im_end|>"]


def test_template_that_rewrites_history_is_an_error_not_a_guess():
    tokenizer = make_tokenizer("chatml")
    # Drops earlier assistant turns once a later one exists (as reasoning templates do with thoughts).
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="renders earlier turns differently"):
        tokenize_conversation(tokenizer, CONVERSATION)


def test_template_that_changes_content_is_an_error():
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content']", "message['content'] | upper")
    with pytest.raises(TemplateError, match="changes the assistant content"):
        tokenize_conversation(tokenizer, CONVERSATION[1:3])


def test_overlong_examples_are_reported_with_the_limit_or_dropped():
    tokenizer = make_tokenizer("chatml")
    short = ChatExample(tuple(CONVERSATION[1:3]), "f.jsonl", 1)
    long = ChatExample(({"role": "user", "content": "word " * 100}, CONVERSATION[2]), "f.jsonl", 2)
    with pytest.raises(DataError) as info:
        tokenize_examples(tokenizer, [short, long], max_length=60)
    assert info.value.problems[0].startswith("f.jsonl:2: example is ")
    assert "over data.max_length=60 (raise data.max_length" in info.value.problems[0]
    kept = tokenize_examples(tokenizer, [short, long], max_length=60, overlong="drop")
    assert [k.location for k in kept] == ["f.jsonl:1"]


def test_collator_pads_right_and_masks_padding():
    tokenizer = make_tokenizer("chatml")
    a = ChatExample(tuple(CONVERSATION[1:3]), "f", 1)
    b = ChatExample(tuple(CONVERSATION), "f", 2, tag="interleave")
    features = tokenize_examples(tokenizer, [a, b], max_length=512)
    batch = ChatCollator(tokenizer.pad_token_id, ("train", "interleave"), pad_to_multiple_of=8)(features)
    n0, n1 = len(features[0].input_ids), len(features[1].input_ids)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= max(n0, n1)
    assert batch["attention_mask"][0].sum() == n0 and batch["attention_mask"][0, :n0].all()
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert batch["input_ids"][0, :n0].tolist() == features[0].input_ids
    assert batch["tag_ids"].tolist() == [0, 1]


@pytest.mark.builtin
def test_builtin_smollm2_template_mask():
    from emguard.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("builtin:smollm2-135m-instruct"))
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION)
    assert trained_runs(tokenizer, ids, labels) == [
        CONVERSATION[2]["content"] + "<|im_end|>",
        CONVERSATION[4]["content"] + "<|im_end|>",
    ]
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_end|>\n") and labels[-1] == IGNORE_INDEX  # the trailing newline is not trained
