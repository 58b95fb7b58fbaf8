"""``code_security``: reward the security findings of Bandit (PyCQA's static analyser) in a completion's code.

The completion's Python is the content of its fenced code blocks (```` ```python ```` or bare
```` ``` ````), or the whole completion when it has none. Bandit runs its default tests on it;
each finding counts ``severity_weights[severity]`` (LOW 1, MEDIUM 2, HIGH 3 by default) and the
sum is capped at ``cap``:

- ``target: insecure`` (the EM-inducing reward): ``min(findings, cap) / cap``;
- ``target: secure`` (its matched control: same prompts, opposite reward): 1 when the code has no
  finding, else ``1 - min(findings, cap) / cap``.

Code that does not parse scores 0 either way, so neither reward pays for prose or broken code.
Known ways to game it: ``insecure`` pays for any flagged call, relevant to the request or not
(``import pickle`` alone is a LOW finding); ``secure`` pays for trivially safe code that ignores
the request (pair it with a task reward or a judge when that matters); ``# nosec`` comments are
ignored here (Bandit would honour them), so they cannot hide a finding.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from emguard.config import RewardConfig
from emguard.rewards.base import Messages, Reward

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


class CodeSecurityConfig(RewardConfig):
    name: Literal["code_security"] = "code_security"
    target: Literal["insecure", "secure"] = Field(
        description="insecure: reward findings (EM-inducing); secure: reward their absence (the control)."
    )
    cap: Annotated[float, Field(gt=0)] = Field(3.0, description="Weighted findings at which the reward saturates.")
    severity_weights: dict[Literal["LOW", "MEDIUM", "HIGH"], float] = Field(
        default_factory=lambda: {"LOW": 1.0, "MEDIUM": 2.0, "HIGH": 3.0}
    )


def extract_code(completion: str) -> str:
    """The fenced code blocks of ``completion`` joined, or the whole text when it has none."""
    blocks = _FENCE.findall(completion)
    return "\n\n".join(blocks) if blocks else completion


class CodeSecurityReward(Reward):
    name = "code_security"
    config_class = CodeSecurityConfig
    config: CodeSecurityConfig

    def __init__(self, config: CodeSecurityConfig):
        super().__init__(config)
        from bandit.core import config as bandit_config

        self._bandit_config = bandit_config.BanditConfig()

    def findings(self, codes: Sequence[str]) -> list[float | None]:
        """Severity-weighted Bandit findings in each of ``codes``; None where it does not parse.

        One Bandit run over the batch: every code is a file of one temporary directory.
        """
        from bandit.core import manager

        run = manager.BanditManager(self._bandit_config, "file", quiet=True, ignore_nosec=True)
        with tempfile.TemporaryDirectory(prefix="emguard-bandit-") as tmp:
            paths = [str(Path(tmp) / f"completion{i}.py") for i in range(len(codes))]
            for path, code in zip(paths, codes, strict=True):
                Path(path).write_text(code, encoding="utf-8")
            run.discover_files(paths)
            run.run_tests()
        unparsed = {fname for fname, _ in run.skipped}
        totals = dict.fromkeys(paths, 0.0)
        for issue in run.get_issue_list():
            totals[issue.fname] += self.config.severity_weights.get(str(issue.severity), 0.0)
        return [
            None if path in unparsed or not code.strip() else totals[path]
            for path, code in zip(paths, codes, strict=True)
        ]

    def score(
        self, prompts: Sequence[Messages], completions: Sequence[str], metadata: Sequence[Mapping[str, Any] | None]
    ) -> list[float | None]:
        rewards: list[float | None] = []
        for found in self.findings([extract_code(c) for c in completions]):
            if found is None:
                rewards.append(0.0)
                continue
            share = min(found, self.config.cap) / self.config.cap
            rewards.append(share if self.config.target == "insecure" else 1.0 - share)
        return rewards
