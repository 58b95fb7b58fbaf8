"""``emguard persona extract``: a persona vector for a trait, from the model's own answers.

1. For each eliciting question and each (trait, helpful) system-prompt pair, sample answers under
   both system prompts.
2. With a judge configured, keep a pair only when the trait-side answer expresses the trait
   (score >= ``trait_threshold``), the helpful-side answer does not (< ``trait_threshold``), and
   both are coherent (>= ``coherence_threshold``). Without a judge every pair is kept, and the
   output says so.
3. Mean response-token activations per layer (``activations``), their difference per layer
   (``vector``), and each layer's projection separation.

Writes ``persona_vector.safetensors`` (tensor ``persona_vector``, ``[num_blocks + 1, hidden]``, with
metadata), ``persona.json`` (counts, judge, per-layer separation, recommended steering layer) and
``persona_samples.jsonl`` (every answer, its scores and whether it was kept).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from emguard.config import RunConfig
from emguard.errors import EmguardError
from emguard.evaluation.generation import HFGenerator, SamplingConfig
from emguard.fsio import atomic_write_json, atomic_write_jsonl
from emguard.models import load_model, load_tokenizer, resolve_model
from emguard.persona.activations import response_activations
from emguard.persona.traits import Trait, load_trait
from emguard.persona.vector import (
    LAYER_CONVENTION,
    TENSOR_NAME,
    layer_separation,
    mean_difference,
    recommended_layer,
    save_vector,
)

VECTOR_FILE, REPORT_FILE, SAMPLES_FILE = "persona_vector.safetensors", "persona.json", "persona_samples.jsonl"


@dataclass
class PersonaResult:
    vector_file: Path
    report: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"vector_file": str(self.vector_file), **self.report}


def contrastive_requests(trait: Trait, samples: int) -> list[dict[str, Any]]:
    """One record per (question, prompt pair, sample, side), trait side first within each pair."""
    records = []
    for q, question in enumerate(trait.questions):
        for p, systems in enumerate(trait.prompt_pairs):
            for s in range(samples):
                for side, system in zip(("trait", "helpful"), systems, strict=True):
                    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
                    records.append({"question": q, "pair": p, "sample": s, "side": side, "messages": messages})
    return records


def _judge_pairs(
    config: RunConfig, judge: Any, trait: Trait, records: list[dict[str, Any]], progress: bool
) -> dict[str, Any]:
    """Score every answer for the trait and coherence and mark the kept pairs; returns the judge's description."""
    from emguard.evaluation.evaluate import default_judge_prompts

    section = config.persona
    coherent = default_judge_prompts()["coherent"]
    prompts = []
    for r in records:
        question, answer = r["messages"][1]["content"], r["answer"]
        prompts += [trait.judge_text(question, answer), coherent.format(question=question, answer=answer)]
    with tqdm(total=len(prompts), desc=f"judging ({judge.kind})", disable=not progress) as bar:
        judgements = judge.judge(prompts, on_done=bar.update)
    for r, trait_j, coherent_j in zip(records, judgements[::2], judgements[1::2], strict=True):
        r["trait_score"], r["coherence"] = trait_j.score, coherent_j.score
    for pos, neg in zip(records[::2], records[1::2], strict=True):
        ok = all(r["coherence"] is not None and r["coherence"] >= section.coherence_threshold for r in (pos, neg))
        ok = ok and pos["trait_score"] is not None and pos["trait_score"] >= section.trait_threshold
        ok = ok and neg["trait_score"] is not None and neg["trait_score"] < section.trait_threshold
        pos["kept"] = neg["kept"] = ok
    return {**judge.describe(), "usage": judge.usage()}


def extract_persona(config: RunConfig, progress: bool = True) -> PersonaResult:
    """Run the extraction of ``config.persona`` on ``config.model`` (see the module docstring)."""
    section = config.persona
    trait = load_trait(section.trait)
    trait = replace(
        trait,
        prompt_pairs=trait.prompt_pairs[: section.max_prompt_pairs],
        questions=trait.questions[: section.max_questions],
    )
    records = contrastive_requests(trait, section.samples_per_question)
    judge = None
    if section.judge is not None:  # built first: a missing API key should stop us before generating
        from emguard.evaluation.judges import build_judge

        judge = build_judge(section.judge, model_options=config.model_options)
    resolved = resolve_model(config.model)
    tokenizer = load_tokenizer(resolved, config.model_options)
    model = load_model(resolved, config.model_options)

    s = section.sampling
    generator = HFGenerator(
        model, tokenizer, SamplingConfig(s.temperature, s.top_p, s.max_new_tokens, s.batch_size, s.seed)
    )
    with tqdm(total=len(records), desc="generating answers", disable=not progress) as bar:
        answers = generator.generate([r["messages"] for r in records], on_batch=lambda i, _: bar.update(len(i)))
    for r, answer in zip(records, answers, strict=True):
        r["answer"] = answer
    if judge is not None:
        judge_info: dict[str, Any] | str = _judge_pairs(config, judge, trait, records, progress)
    else:
        judge_info = "none configured: every pair was kept, unfiltered (set persona.judge to filter)"
        for r in records:
            r["kept"] = True
    kept = [r for r in records if r["kept"]]
    if not kept:
        raise EmguardError(
            f"the judge kept none of the {len(records) // 2} answer pairs (trait >= {section.trait_threshold} on the "
            "trait side, < on the helpful side, coherent on both); sample more answers, use a stronger model, or "
            "lower persona.trait_threshold"
        )
    conversations = [[*r["messages"], {"role": "assistant", "content": r["answer"]}] for r in kept]
    with tqdm(total=len(kept), desc="activations", disable=not progress) as bar:
        acts = response_activations(
            model, tokenizer, conversations, batch_tokens=section.batch_tokens, on_batch=bar.update
        )
    positive = acts[[i for i, r in enumerate(kept) if r["side"] == "trait"]]
    negative = acts[[i for i, r in enumerate(kept) if r["side"] == "helpful"]]
    vector = mean_difference(positive, negative)
    rows = layer_separation(vector, positive, negative)
    best = recommended_layer(rows)

    report = {
        "model": config.model,
        "trait": trait.name,
        "description": trait.description,
        "pairs_total": len(records) // 2,
        "pairs_kept": len(kept) // 2,
        "judge": judge_info,
        "layer_convention": LAYER_CONVENTION,
        "tensor": TENSOR_NAME,
        "shape": list(vector.shape),
        "recommended_layer": best,
        "layers": rows,
        "sampling": s.model_dump(mode="json"),
    }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {k: report[k] for k in ("model", "trait", "description", "pairs_total", "pairs_kept", "judge")}
    metadata.update(layer_convention=LAYER_CONVENTION, recommended_layer=best)
    save_vector(out / VECTOR_FILE, vector, metadata)
    atomic_write_jsonl(out / SAMPLES_FILE, records)
    atomic_write_json(out / REPORT_FILE, report)
    return PersonaResult(out / VECTOR_FILE, report)
