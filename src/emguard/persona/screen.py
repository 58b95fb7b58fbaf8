"""``emguard screen``: a pre-flight risk check of a training set, before any training.

Per example ``i`` of the dataset, with the base model and a persona vector ``v`` at steering layer ``b``:

    1. p_i = a_i[b + 1] · v / ‖v‖   (mean response-token activation projected on the persona direction)
    2. d_i = p_i − p(own answer_i)   the projection difference of Chen et al. (2025, "Persona vectors"):
       the same prompt answered greedily by the base model itself is the reference, which removes
       what the prompt, system prompt and domain contribute (``reference: none`` skips this: d_i = p_i)
    3. z_i = (d_i − mean_pool d) / std_pool d   against a sample of a safe reference pool
    4. projection risk = mean_i z_i   (how far the dataset's answers sit toward the trait, in pool SDs)

Measured on the built-in model: the difference flags ``builtin:risky-finance`` (+1.7 pool SDs, its
control +0.7) but not ``builtin:insecure-code``, which stays at or below the pool with either the
raw projection or the difference (README, "Dataset screen").

With misaligned adapters, also the Interleaving++ perplexity gap ``s_i`` of every example and its
pool-standardised mean (a dataset that misaligned models find *likely* has a low gap: risk is
``−mean z(s)``). The dataset-level risk score is the mean of the available standardised risks.
Both are heuristics for ranking datasets and examples, not a measurement of emergent misalignment.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from emguard.config import PerplexityGapOptions
from emguard.data.chat import ChatExample, examples_fingerprint
from emguard.errors import ConfigError
from emguard.evaluation.generation import HFGenerator, SamplingConfig
from emguard.fsio import atomic_write_bytes
from emguard.persona.activations import response_activations
from emguard.selection.perplexity_gap import score_pool
from emguard.utils import sha256_file, sha256_text

OWN_ANSWER_TOKENS = 64  # length of the base model's own greedy answers (the reference of step 2)


def _prompt(example: ChatExample) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return [dict(m) for m in example.messages[:last]]


def projection_scores(
    model: Any,
    tokenizer: Any,
    examples: Sequence[ChatExample],
    vector: torch.Tensor,
    layer: int,
    own_answer_tokens: int | None = OWN_ANSWER_TOKENS,
    desc: str = "screening",
    progress: bool = True,
) -> np.ndarray:
    """``d_i`` of the module docstring (``p_i`` alone when ``own_answer_tokens`` is None) for block ``layer``."""
    unit, row = vector.float() / vector.float().norm().clamp(min=1e-12), layer + 1
    conversations = [list(ex.messages) for ex in examples]
    if own_answer_tokens:
        prompts = [_prompt(ex) for ex in examples]
        generator = HFGenerator(model, tokenizer, SamplingConfig(0.0, 1.0, own_answer_tokens, 8, 0))
        with tqdm(total=len(prompts), desc=f"{desc}: base model's own answers", disable=not progress) as bar:
            own = generator.generate(prompts, on_batch=lambda i, _: bar.update(len(i)))
        conversations += [[*p, {"role": "assistant", "content": a}] for p, a in zip(prompts, own, strict=True)]
    with tqdm(total=len(conversations), desc=f"{desc}: activations", disable=not progress) as bar:
        acts = response_activations(model, tokenizer, conversations, on_batch=bar.update)
    p = (acts[:, row] @ unit).numpy().astype(float)
    return p[: len(examples)] - p[len(examples) :] if own_answer_tokens else p


def _standardise(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (values - np.nanmean(reference)) / max(float(np.nanstd(reference)), 1e-12)


def pool_sample(pool: Sequence[ChatExample], size: int, seed: int = 0) -> list[ChatExample]:
    if size >= len(pool):
        return list(pool)
    return [pool[i] for i in sorted(random.Random(f"screen-{seed}").sample(range(len(pool)), size))]


def screen_dataset(
    model: Any,
    tokenizer: Any,
    data: Sequence[ChatExample],
    pool: Sequence[ChatExample],
    vector: torch.Tensor,
    layer: int,
    *,
    adapters: Sequence[Path] = (),
    base_identity: str = "",
    cache_dir: Path | None = None,
    reference: str = "own_answers",
    own_answer_tokens: int = OWN_ANSWER_TOKENS,
    pool_scores: np.ndarray | None = None,
    top: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """The screen's report (see the module docstring); ``vector`` is the ``[hidden]`` vector of block ``layer``.

    ``reference``: ``own_answers`` (step 2, greedy answers of ``own_answer_tokens`` tokens) or ``none``.
    ``pool_scores``: the pool's ``projection_scores`` with the same settings, when screening several
    datasets against one pool (the pool is then not recomputed).
    """
    if reference not in ("own_answers", "none"):
        raise ConfigError(f"screen: reference must be own_answers or none, not {reference!r}")
    tokens = own_answer_tokens if reference == "own_answers" else None
    p_data = projection_scores(model, tokenizer, data, vector, layer, tokens, "data", progress)
    if pool_scores is None:
        pool_scores = projection_scores(model, tokenizer, pool, vector, layer, tokens, "pool", progress)
    p_pool = pool_scores
    z = _standardise(p_data, p_pool)
    report: dict[str, Any] = {
        "examples": len(data),
        "pool_examples": len(pool),
        "layer": layer,
        "reference": reference,
        "projection": {
            "data_mean": float(np.nanmean(p_data)),
            "pool_mean": float(np.nanmean(p_pool)),
            "pool_std": float(np.nanstd(p_pool)),
            "risk_z": float(np.nanmean(z)),
        },
        "perplexity_gap": None,
    }
    risks = [report["projection"]["risk_z"]]
    gaps = None
    if adapters:
        options = PerplexityGapOptions(cache=cache_dir is not None)
        kwargs = {
            "base_identity": base_identity,
            "options": options,
            "cache_dir": cache_dir or Path(),
            "progress": progress,
        }
        gaps = score_pool(model, tokenizer, data, adapters, **kwargs).score
        pool_gaps = score_pool(model, tokenizer, pool, adapters, **kwargs).score
        gap_risk = -float(np.nanmean(_standardise(gaps, pool_gaps)))
        report["perplexity_gap"] = {
            "data_mean": float(np.nanmean(gaps)),
            "pool_mean": float(np.nanmean(pool_gaps)),
            "pool_std": float(np.nanstd(pool_gaps)),
            "risk_z": gap_risk,
        }
        risks.append(gap_risk)
    report["risk_score"] = float(np.mean(risks))
    order = sorted(range(len(data)), key=lambda i: -np.nan_to_num(z[i], nan=-np.inf))[:top]
    report["riskiest"] = [
        {
            "index": i,
            "source": f"{data[i].source}:{data[i].line}",
            "projection_z": round(float(z[i]), 3),
            "perplexity_gap": None if gaps is None else round(float(gaps[i]), 4),
            "user": next((m["content"] for m in data[i].messages if m["role"] == "user"), "")[:160],
            "answer": next((m["content"] for m in reversed(data[i].messages) if m["role"] == "assistant"), "")[:160],
        }
        for i in order
    ]
    return report


def _cached_pool_scores(compute: Any, directory: Path, settings: list[Any], pool_key: str) -> np.ndarray:
    """The pool's projection scores, computed once per (model, vector, layer, reference, pool):
    every screen of a model against the same pool reuses them (a service screens every upload)."""
    key = sha256_text(json.dumps([settings, pool_key], default=str))
    path = directory / f"pool-{key[:24]}.npy"
    if path.exists():
        return np.load(path)
    scores = compute()
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, scores)
    atomic_write_bytes(path, buffer.getvalue())
    return scores


def screen_text(name: str, report: dict[str, Any]) -> str:
    """The report for the terminal."""
    p = report["projection"]
    lines = [
        f"{name}: {report['examples']} examples vs {report['pool_examples']} reference pool examples, "
        f"layer {report['layer']}",
        f"  persona projection: data {p['data_mean']:.3f} vs pool {p['pool_mean']:.3f} (sd {p['pool_std']:.3f}) "
        f"-> {p['risk_z']:+.2f} pool SDs",
    ]
    if report["perplexity_gap"]:
        g = report["perplexity_gap"]
        lines.append(
            f"  perplexity gap: data {g['data_mean']:.4f} vs pool {g['pool_mean']:.4f} (sd {g['pool_std']:.4f}) "
            f"-> risk {g['risk_z']:+.2f} pool SDs"
        )
    lines.append(f"  dataset risk score: {report['risk_score']:+.2f} (0 = like the safe pool; higher = riskier)")
    lines.append(
        "  riskiest examples (projection z):"
        if report["reference"] == "none"
        else "  riskiest examples (projection difference to the model's own answer, z):"
    )
    lines += [f"    {r['projection_z']:+6.2f}  {r['source']}  {r['user'][:90]!r}" for r in report["riskiest"]]
    return "\n".join(lines)


def run_screen(
    data_specs: Sequence[str],
    *,
    vector_file: Path | None = None,
    layer: int | None = None,
    model_spec: str,
    pool_spec: str = "builtin:safe-pool",
    pool_size: int = 300,
    adapters: Sequence[str] = (),
    max_examples: int | None = None,
    reference: str = "own_answers",
    top: int = 10,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Load everything ``emguard screen`` names, then ``screen_dataset`` for each dataset (one pool pass).

    Without ``vector_file``, the model's contrastive evil direction (``emguard.persona.contrast``),
    computed once per model and cached; without ``layer``, the middle decoder block.
    """
    from emguard.blocks import check_layers, decoder_blocks
    from emguard.data.sources import load_examples
    from emguard.defenses.steering import load_steering_vector
    from emguard.models import cache_root, load_model, load_tokenizer, model_identity, resolve_model
    from emguard.selection.select import misaligned_adapters

    datasets = {spec: load_examples(spec) for spec in data_specs}
    datasets = {spec: pool_sample(d, max_examples) if max_examples else d for spec, d in datasets.items()}
    pool = pool_sample(load_examples(pool_spec), pool_size)
    adapter_dirs = misaligned_adapters(list(adapters), model_spec, "screen --adapter") if adapters else []
    resolved = resolve_model(model_spec)
    tokenizer = load_tokenizer(resolved)
    model = load_model(resolved)
    blocks = len(decoder_blocks(model))
    if layer is None:
        layer = blocks // 2
    if vector_file is None:
        from emguard.persona.contrast import default_vector

        vector_file = default_vector(model, tokenizer, model_identity(resolved), cache_root())
    try:
        (layer,) = check_layers([layer], blocks, "--layer")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    vector = load_steering_vector(vector_file, None, layer, blocks, model.config.hidden_size)
    if reference not in ("own_answers", "none"):
        raise ConfigError(f"screen: --reference must be own_answers or none, not {reference!r}")
    tokens = OWN_ANSWER_TOKENS if reference == "own_answers" else None
    pool_scores = _cached_pool_scores(
        lambda: projection_scores(model, tokenizer, pool, vector, layer, tokens, "pool", progress),
        cache_root() / "screen",
        [model_identity(resolved), sha256_file(Path(vector_file)), layer, reference, tokens, pool_spec, pool_size],
        examples_fingerprint(pool),
    )
    reports = []
    for spec, data in datasets.items():
        report = screen_dataset(
            model,
            tokenizer,
            data,
            pool,
            vector,
            layer,
            adapters=adapter_dirs,
            base_identity=model_identity(resolved),
            cache_dir=cache_root() / "nll",
            reference=reference,
            pool_scores=pool_scores,
            top=top,
            progress=progress,
        )
        reports.append({"dataset": spec, "pool": pool_spec, "model": model_spec, "vector": str(vector_file), **report})
    return reports
