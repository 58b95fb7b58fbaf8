"""LLM judges behind one interface: ``openai`` (any OpenAI-compatible endpoint) and ``local`` (a causal LM)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from emguard.evaluation.judges.base import Judge, Judgement, parse_score, score_from_top_logprobs
from emguard.evaluation.judges.cache import JudgeCache

if TYPE_CHECKING:
    from emguard.config import JudgeSection, ModelOptions

__all__ = ["Judge", "JudgeCache", "Judgement", "build_judge", "parse_score", "score_from_top_logprobs"]


def build_judge(
    section: JudgeSection, cache_dir: Path | None = None, model_options: ModelOptions | None = None
) -> Judge:
    """The judge a config's ``eval.judge`` section describes (models load lazily, here).

    ``cache_dir`` defaults to the section's ``cache_dir``, else ``$EMGUARD_CACHE/judge``.
    """
    if cache_dir is None:
        from emguard.models import cache_root

        cache_dir = Path(section.cache_dir) if section.cache_dir else cache_root() / "judge"
    if section.kind == "openai":
        from emguard.evaluation.judges.openai_judge import OpenAIJudge

        prices = section.price_per_million_tokens
        return OpenAIJudge(
            section.model,
            base_url=section.base_url,
            api_key_env=section.api_key_env,
            concurrency=section.concurrency,
            max_retries=section.max_retries,
            timeout_s=section.timeout_s,
            backoff_s=section.backoff_s,
            cache=JudgeCache(cache_dir) if section.cache else None,
            prices=(prices.get("input", 0.0), prices.get("output", 0.0)) if prices else None,
        )
    from emguard.evaluation.judges.local_judge import LocalJudge
    from emguard.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(section.model)
    return LocalJudge(load_model(resolved, model_options), load_tokenizer(resolved, model_options), section.model)
