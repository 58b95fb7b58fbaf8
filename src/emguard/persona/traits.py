"""Persona traits: what a persona vector separates (a description, contrastive system prompts,
eliciting questions, a judge prompt). ``builtin:evil`` ships with emguard; a YAML file of the same
shape (see ``traits/evil.yaml``) defines any other trait."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from emguard.errors import ConfigError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Trait:
    name: str
    description: str
    prompt_pairs: tuple[tuple[str, str], ...]  # (trait-expressing system prompt, helpful system prompt)
    questions: tuple[str, ...]
    judge_prompt: str  # with {trait}, {description}, {question}, {answer}

    def judge_text(self, question: str, answer: str) -> str:
        return self.judge_prompt.format(trait=self.name, description=self.description, question=question, answer=answer)


def load_trait(spec: str) -> Trait:
    """``builtin:NAME`` or a YAML path; ConfigError saying what is missing otherwise."""
    if spec.startswith(BUILTIN_PREFIX):
        folder = resources.files("emguard.persona") / "traits"
        resource = folder / f"{spec.removeprefix(BUILTIN_PREFIX)}.yaml"
        if not resource.is_file():
            names = sorted(BUILTIN_PREFIX + p.name.removesuffix(".yaml") for p in folder.iterdir())
            raise ConfigError(f"unknown built-in trait {spec!r}; available: {', '.join(names)}")
        text = resource.read_text(encoding="utf-8")
    elif Path(spec).is_file():
        text = Path(spec).read_text(encoding="utf-8")
    else:
        raise ConfigError(f"persona.trait {spec!r}: no such file (or builtin:evil)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"persona.trait {spec}: not valid YAML ({e})") from None
    problems = []
    if not isinstance(data, dict):
        data, problems = {}, ["the file must hold a mapping"]
    for key in ("name", "description", "judge_prompt"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            problems.append(f"{key} must be a non-empty string")
    pairs = data.get("prompt_pairs")
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        problems.append("prompt_pairs must be a list of [trait system prompt, helpful system prompt] pairs")
    questions = data.get("questions")
    if not isinstance(questions, list) or not questions or not all(isinstance(q, str) for q in questions):
        problems.append("questions must be a non-empty list of strings")
    for placeholder in ("{question}", "{answer}"):
        if isinstance(data.get("judge_prompt"), str) and placeholder not in data["judge_prompt"]:
            problems.append(f"judge_prompt must contain {placeholder}")
    if problems:
        raise ConfigError(f"persona.trait {spec}: " + "; ".join(problems))
    return Trait(
        data["name"], data["description"].strip(), tuple(map(tuple, pairs)), tuple(questions), data["judge_prompt"]
    )
