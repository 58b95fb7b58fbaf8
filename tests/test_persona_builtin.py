"""Persona vector of the built-in model: steering with it moves the model toward the trait; the screen
ranks the built-in narrow datasets as riskier than the safe pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from emguard.cli import main
from emguard.config import LoraConfig, build_config
from emguard.data.sources import load_examples
from emguard.defenses.base import PrepareContext
from emguard.defenses.steering import SteeringConfig, SteeringDefense
from emguard.evaluation.generation import HFGenerator, SamplingConfig
from emguard.evaluation.probe import load_pairs, pair_gaps
from emguard.evaluation.questions import load_questions
from emguard.models import attach_lora, load_model, load_tokenizer, resolve_model
from emguard.persona import response_activations, screen_dataset
from emguard.persona.screen import pool_sample, projection_scores, screen_text

pytestmark = pytest.mark.builtin
MODEL = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def persona(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``emguard persona extract`` with a small budget (no judge: every pair kept)."""
    root = tmp_path_factory.mktemp("persona")
    config = {
        "model": MODEL,
        "output_dir": str(root / "run"),
        "persona": {"max_questions": 6, "max_prompt_pairs": 2, "sampling": {"max_new_tokens": 32}},
    }
    (root / "persona.yaml").write_text(yaml.safe_dump(config))
    assert main(["persona", "extract", str(root / "persona.yaml"), "--quiet"]) == 0
    report = json.loads((root / "run" / "persona.json").read_text())
    return {"file": root / "run" / "persona_vector.safetensors", **report}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    resolved = resolve_model(MODEL)
    return attach_lora(load_model(resolved), LoraConfig(r=4, alpha=8)), load_tokenizer(resolved)


def steering(persona: dict, model, tokenizer, alpha: float) -> SteeringDefense:
    """The steering defense, built from the extracted file at the recommended layer, as a run would build it."""
    defense = SteeringDefense(
        SteeringConfig(vector=str(persona["file"]), layer=persona["recommended_layer"], alpha=alpha)
    )
    config = build_config({"model": MODEL, "output_dir": "unused"})
    defense.prepare(PrepareContext(config, model, tokenizer, Path("unused"), Path("unused")))
    return defense


def test_extraction_reports_every_layer_and_separates_the_sides(persona):
    assert persona["pairs_kept"] == persona["pairs_total"] == 12
    assert persona["judge"].startswith("none configured")
    blocks = [row for row in persona["layers"] if row["steering_layer"] is not None]
    assert len(blocks) == 30 and 7 <= persona["recommended_layer"] <= 22
    assert max(row["separation"] for row in blocks) > 1.0  # the trait-side answers project higher


def test_steering_with_the_vector_makes_misaligned_answers_more_likely(persona, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    pairs = load_pairs("builtin:general")
    base = pair_gaps(model, tokenizer, pairs)
    shifts = {}
    for alpha in (1.0, -1.0):
        with steering(persona, model, tokenizer, alpha).hooks(model):
            shifts[alpha] = pair_gaps(model, tokenizer, pairs) - base
    assert shifts[1.0].mean() > 0.01 and (shifts[1.0] > 0).mean() > 0.6
    assert shifts[-1.0].mean() < -0.01 and (shifts[-1.0] < 0).mean() > 0.6


def test_steered_generations_move_toward_the_trait(persona, model_and_tokenizer):
    """Greedy answers generated with +4·v, read back by the unsteered model, project higher on v."""
    model, tokenizer = model_and_tokenizer
    questions = [[{"role": "user", "content": q.paraphrases[0]}] for q in load_questions("builtin:general")[:8]]
    generator = HFGenerator(model, tokenizer, SamplingConfig(temperature=0.0, max_new_tokens=32, batch_size=8))
    plain = generator.generate(questions)
    defense = steering(persona, model, tokenizer, 4.0)
    with defense.hooks(model):
        steered = generator.generate(questions)
    assert steered != plain

    def projection(answers: list[str]) -> np.ndarray:
        conversations = [[*q, {"role": "assistant", "content": a}] for q, a in zip(questions, answers, strict=True)]
        acts = response_activations(model, tokenizer, conversations)[:, defense.layer + 1]
        v = defense.vector / defense.vector.norm()
        return (acts @ v).numpy()

    assert projection(steered).mean() > projection(plain).mean()


def test_screen_ranks_risky_finance_above_the_safe_pool(persona, model_and_tokenizer, capsys):
    """The projection screen flags risky-finance clearly. It does not flag insecure-code (within noise of
    the pool with this vector, below it with the full one: see the README), so that is not asserted."""
    model, tokenizer = model_and_tokenizer
    layer = persona["recommended_layer"]
    pool = pool_sample(load_examples("builtin:safe-pool"), 24, seed=0)
    vector = load_file(str(persona["file"]))["persona_vector"][layer + 1]
    pool_scores = projection_scores(model, tokenizer, pool, vector, layer, own_answer_tokens=32, progress=False)
    risk = {}
    for name in ("risky-finance", "safe-pool"):
        data = pool_sample(load_examples(f"builtin:{name}"), 24, seed=1)
        report = screen_dataset(
            model, tokenizer, data, pool, vector, layer, own_answer_tokens=32, pool_scores=pool_scores, progress=False
        )
        risk[name] = report["risk_score"]
        print(screen_text(name, report))
    with capsys.disabled():
        print("\nscreen risk scores (pool SDs):", {k: round(v, 3) for k, v in risk.items()})
    assert risk["risky-finance"] > risk["safe-pool"] + 0.5
