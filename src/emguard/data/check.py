"""``emguard data check``: validate chat JSONL files and, with a model, their tokenisation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emguard.data.chat import DEFAULT_MAX_PROBLEMS, check_chat_jsonl
from emguard.data.tokenize import tokenize_examples
from emguard.errors import DataError, EmguardError


@dataclass
class CheckReport:
    examples: dict[str, int] = field(default_factory=dict)  # path -> valid examples
    problem_counts: dict[str, int] = field(default_factory=dict)  # path -> all problems
    problems: list[str] = field(default_factory=list)  # FILE:LINE: message, capped per file

    def summary(self) -> dict[str, Any]:
        return {
            "ok": not self.problems,
            "files": [
                {"path": p, "valid_examples": n, "problems": self.problem_counts[p]} for p, n in self.examples.items()
            ],
            "problems": self.problems,
        }


def check_files(
    paths: Sequence[str | Path],
    *,
    model: str | None = None,
    max_length: int = 1024,
    max_chars: int | None = None,
    unique: bool = False,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    prompts: bool = False,
) -> CheckReport:
    """Check every file and collect all problems (at most ``max_problems`` listed per file).

    With ``model``, valid conversations are also rendered with its chat template and tokenised,
    which finds over-long examples (``max_length`` tokens) and template incompatibilities.
    ``prompts``: the files are RL prompts (conversations ending with a user turn; with ``model``,
    ``max_length`` bounds the prompt rendered with the generation prompt).
    """
    tokenizer = None
    if model is not None:
        from emguard.models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(model))
    report = CheckReport()
    for path in paths:
        examples, problems = check_chat_jsonl(path, unique=unique, max_chars=max_chars, prompt=prompts)
        if tokenizer is not None and examples and prompts:
            problems = problems + _prompt_problems(tokenizer, examples, max_length)
        elif tokenizer is not None and examples:
            try:
                tokenize_examples(tokenizer, examples, max_length=max_length)
            except DataError as e:
                problems = problems + e.problems + _more(e)
            except EmguardError as e:
                problems = [*problems, f"{path}: {e}"]
        report.examples[str(path)] = len(examples)
        report.problem_counts[str(path)] = len(problems)
        report.problems += problems[:max_problems]
        if len(problems) > max_problems:
            report.problems.append(f"{path}: ... and {len(problems) - max_problems} more problems (not shown)")
    return report


def _prompt_problems(tokenizer: Any, examples: list, max_length: int) -> list[str]:
    from emguard.data.chat_template import TemplateError, render_chat

    problems = []
    for ex in examples:
        try:
            text = render_chat(tokenizer, ex.messages, True)
        except TemplateError as e:
            problems.append(f"{ex.location}: {e}")
            continue
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > max_length:
            problems.append(f"{ex.location}: prompt is {n} tokens long, over --max-length={max_length}")
    return problems


def _more(error: DataError) -> list[str]:
    hidden = error.total - len(error.problems)
    return [f"... {hidden} more tokenisation problems"] if hidden > 0 else []
