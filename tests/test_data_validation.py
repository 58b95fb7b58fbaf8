"""Chat JSONL validation: every problem reported as FILE:LINE, all at once, nothing returned."""

from __future__ import annotations

import json

import pytest

from conftest import chat, write_jsonl
from emguard.data.chat import read_chat_jsonl
from emguard.data.check import check_files
from emguard.errors import DataError

GOOD = chat("What is 2 + 2?", "4.")


def problems_of(tmp_path, rows, **kwargs) -> list[str]:
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_chat_jsonl(path, **kwargs)
    prefix = f"{path}:"
    assert all(p.startswith(prefix) for p in info.value.problems), info.value.problems
    return [p.removeprefix(prefix) for p in info.value.problems]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ('{"messages": [', "1: invalid JSON: Expecting value at column 15"),
        ("[1, 2]", "1: expected a JSON object with a 'messages' list, got a list"),
        ({"msgs": []}, "1: unknown key 'msgs' (allowed: messages, metadata)"),
        ({"messages": []}, "1: 'messages' must be a non-empty list, got a list"),
        ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "1: messages[0]: missing 'role'"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "1: messages[0]: unknown role 'bot' (allowed: system, user, assistant)",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
            "1: messages[1]: empty 'content'",
        ),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
            "1: messages[0]: 'content' must be a string, got a number",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "1: no assistant turn: there is nothing to train on"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y"},
                    {"role": "user", "content": "z"},
                ]
            },
            "1: the conversation must end with an assistant turn, not 'user'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "user", "content": "y"},
                    {"role": "assistant", "content": "z"},
                ]
            },
            "1: messages[1]: expected a 'assistant' turn here, got 'user' (turns must alternate)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y"},
                    {"role": "system", "content": "s"},
                ]
            },
            "1: messages[2]: a system turn is only allowed first",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
            "1: every assistant turn has weight 0: there is nothing to train on",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]},
            "1: messages[0]: 'weight' is only allowed on assistant turns",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "name": "a"}]},
            "1: messages[1]: unknown key 'name' (allowed: role, content, weight)",
        ),
    ],
)
def test_each_kind_of_broken_line_is_reported(tmp_path, row, expected):
    assert expected in problems_of(tmp_path, [row])


def test_all_problems_of_a_file_are_reported_at_once_in_line_order(tmp_path):
    rows = [GOOD, "{oops", GOOD, {"messages": [{"role": "user", "content": "x"}]}, "", GOOD, "[]"]
    problems = problems_of(tmp_path, rows)
    assert [p.split(":")[0] for p in problems] == ["2", "4", "7"]  # blank line 5 is skipped, not an error


def test_non_utf8_line_names_the_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        read_chat_jsonl(path)
    assert info.value.problems == [f"{path}:2: not valid UTF-8 (byte 0xe9 at column 18); re-encode the file as UTF-8"]


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert len(read_chat_jsonl(path)) == 1


def test_duplicates_are_errors_only_when_asked(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, chat("other", "x"), GOOD])
    assert len(read_chat_jsonl(path)) == 3
    assert problems_of(tmp_path, [GOOD, chat("other", "x"), GOOD], unique=True) == ["3: duplicate of line 1"]


def test_character_limit_names_the_limit(tmp_path):
    assert problems_of(tmp_path, [chat("x" * 50, "y" * 60)], max_chars=100) == [
        "1: conversation is 110 characters long, over the limit of 100"
    ]


def test_problem_list_is_capped_with_a_count(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{bad"] * 80)
    with pytest.raises(DataError) as info:
        read_chat_jsonl(path, max_problems=10)
    assert len(info.value.problems) == 10 and info.value.total == 80
    assert str(info.value).endswith("... and 70 more problems (not shown)")


def test_valid_file_keeps_order_locations_and_metadata(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", {**chat("a", "b"), "metadata": {"id": 7}}])
    examples = read_chat_jsonl(path)
    assert [ex.line for ex in examples] == [1, 3]
    assert examples[1].location == f"{path}:3" and examples[1].metadata == {"id": 7}
    assert examples[1].to_record() == {**chat("a", "b"), "metadata": {"id": 7}}


def test_missing_and_empty_files(tmp_path):
    report = check_files([tmp_path / "nope.jsonl", write_jsonl(tmp_path / "empty.jsonl", [])])
    assert report.problems == [
        f"{tmp_path / 'nope.jsonl'}: no such file",
        f"{tmp_path / 'empty.jsonl'}: no examples (the file is empty)",
    ]


def test_check_with_a_model_finds_overlong_examples(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, chat("word " * 200, "ok")])
    report = check_files([path], model=str(tiny_model_dir), max_length=64)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{path}:2: example is ")
    assert "over data.max_length=64" in report.problems[0]


def test_upstream_em_dataset_is_valid(upstream):
    report = check_files([upstream / "tan" / "aesthetic_preferences_unpopular.jsonl"])
    assert report.problems == []
    assert list(report.examples.values()) == [5000]
