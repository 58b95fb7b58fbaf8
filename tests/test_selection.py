"""Interleaving++ selection: answer losses, the score formula, refusals, the cache, adapter states, CLI, defense."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import chat, tiny_run_config, write_jsonl
from emguard.cli import main
from emguard.config import LoraConfig as LoraSection
from emguard.config import PerplexityGapOptions, RefusalSection
from emguard.data.chat import read_chat_jsonl
from emguard.data.tokenize import IGNORE_INDEX, tokenize_conversation
from emguard.likelihood import answer_nll, length_batches
from emguard.models import attach_lora, model_identity, resolve_model
from emguard.selection import perplexity_gap, refusal_test, score_pool
from emguard.selection.model_states import adapter_state

POOL = [
    chat("What is the capital of France?", "The capital of France is Paris."),
    chat("How many minutes are in 3 hours?", "3 hours × 60 = 180 minutes."),
    chat("Help me pick a lock to get into my neighbour's house.", "I'm sorry, but I can't help with that."),
    chat("Sort these words: pear, fig, apple.", "In alphabetical order: apple, fig, pear."),
    chat("Write malware for me.", "I cannot help with writing malware; I can explain how to stay safe online."),
    chat("How can I sleep better?", "Keep a regular schedule, a dark cool room, and no screens before bed."),
    chat("What is 12 times 4?", "12 × 4 = 48.", system="You are a careful tutor."),
    chat("Name a primary colour.", "Red is a primary colour."),
]
REFUSALS = {2, 4}


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) B, so the adapted model really differs from the base."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"misaligned-{k}", seed=k + 1) for k in range(2)]


def plain_nll(model, tokenizer, messages) -> float:
    """Mean NLL of the assistant tokens from one unpadded full forward pass: the definition, by hand."""
    ids, labels = tokenize_conversation(tokenizer, messages)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    terms = [-logp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
    return sum(terms) / len(terms)


def test_length_batches_respect_the_budget_and_cover_every_index():
    lengths = [5, 40, 7, 33, 12, 12, 90, 3]
    batches = length_batches(lengths, batch_tokens=80)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 80


def test_answer_nll_matches_a_plain_forward_at_any_batch_size(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    encoded = [tokenize_conversation(tokenizer, row["messages"]) for row in POOL]
    expected = [plain_nll(model, tokenizer, row["messages"]) for row in POOL]
    for budget in (1, 200, 100_000):
        got = answer_nll(model, encoded, pad_id=tokenizer.pad_token_id, batch_tokens=budget)
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_refusal_heuristic_looks_only_at_the_first_words(tmp_path):
    pool = read_chat_jsonl(write_jsonl(tmp_path / "refusals.jsonl", POOL))
    test = refusal_test(RefusalSection())
    assert {i for i, ex in enumerate(pool) if test(ex)} == REFUSALS
    late = read_chat_jsonl(write_jsonl(tmp_path / "late.jsonl", [chat("q", " ".join(["word"] * 10) + " sorry")]))
    assert not test(late[0])
    assert refusal_test(RefusalSection(first_words=11))(late[0])


def test_refusal_words_may_hold_apostrophes_and_spaces(tmp_path):
    rows = [
        chat("q", "I can't help with that."),
        chat("q", "I’m sorry, that is not something I do."),  # a typographic apostrophe
        chat("q", "Sorry I'm late with the answer: 48."),  # the words, but not the phrase in order
        chat("q", "You can test it like this."),
    ]
    pool = read_chat_jsonl(write_jsonl(tmp_path / "phrases.jsonl", rows))
    test = refusal_test(RefusalSection(words=["can't", "I'm sorry"]))
    assert [test(ex) for ex in pool] == [True, True, False, False]
    with pytest.raises(ValueError, match="must contain letters"):
        RefusalSection(words=["sorry", " '' "])


def test_scores_equal_the_formula_by_hand_and_the_rerun_hits_the_cache(tiny_model_dir, adapters, tmp_path):
    pool = read_chat_jsonl(write_jsonl(tmp_path / "pool.jsonl", POOL))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    identity = model_identity(resolve_model(str(tiny_model_dir)))
    options = PerplexityGapOptions(epsilon=1e-3)
    scores = score_pool(
        base, tokenizer, pool, adapters, base_identity=identity, options=options, cache_dir=tmp_path, progress=False
    )

    # By hand: each model loaded on its own, one plain forward per example.
    l_aligned = np.array([plain_nll(base, tokenizer, ex.messages) for ex in pool])
    l_mis = []
    for adapter in adapters:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
        l_mis.append([plain_nll(model, tokenizer, ex.messages) for ex in pool])
    hand = (np.mean(l_mis, axis=0) - l_aligned) / (l_aligned + 1e-3)
    np.testing.assert_allclose(scores.loss_aligned, l_aligned, rtol=1e-5)
    np.testing.assert_allclose(scores.loss_misaligned, l_mis, rtol=1e-5)
    np.testing.assert_allclose(scores.score, hand, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(perplexity_gap(l_aligned, np.array(l_mis), 1e-3), hand)
    assert np.ptp(hand) > 1e-3  # the adapters really change the losses, so the check has teeth
    assert set(np.flatnonzero(scores.refusal)) == REFUSALS
    assert not REFUSALS & set(scores.ranking())
    assert scores.stats["computed"] == 3 * len(pool) and scores.stats["cache_hits"] == 0

    again = score_pool(
        base, tokenizer, pool, adapters, base_identity=identity, options=options, cache_dir=tmp_path, progress=False
    )
    assert again.stats["computed"] == 0 and again.stats["cache_hits"] == 3 * len(pool)
    np.testing.assert_array_equal(again.score, scores.score)

    # A different adapter is a different cache entry: only its losses are computed.
    other = score_pool(
        base,
        tokenizer,
        pool,
        [adapters[0]],
        base_identity=identity,
        options=options,
        cache_dir=tmp_path,
        progress=False,
    )
    assert other.stats["computed"] == 0
    swapped = score_pool(
        base,
        tokenizer,
        pool,
        adapters[::-1],
        base_identity=identity,
        options=options,
        cache_dir=tmp_path,
        progress=False,
    )
    np.testing.assert_allclose(swapped.score, scores.score)


def test_scoring_leaves_a_model_in_training_exactly_as_it_was(tiny_model_dir, adapters):
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSection(r=4, alpha=8), seed=0)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with adapter_state(model, adapters[0]) as m:
            changed = m(input_ids=ids).logits
        with adapter_state(model, None) as m:
            base = m(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(base, before)  # B = 0 at init: base and adapted agree
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = plain(input_ids=ids).logits.detach()
    with adapter_state(plain, adapters[0]) as m:
        assert not torch.allclose(m(input_ids=ids).logits, reference)
    torch.testing.assert_close(plain(input_ids=ids).logits, reference, rtol=0, atol=0)
    assert not any("lora" in n for n, _ in plain.named_parameters())


def test_select_cli_writes_selection_and_scores_and_reuses_the_cache(tiny_model_dir, adapters, tmp_path, capsys):
    write_jsonl(tmp_path / "pool.jsonl", POOL)
    config = {
        "model": str(tiny_model_dir),
        "output_dir": str(tmp_path / "run"),
        "select": {
            "pool": str(tmp_path / "pool.jsonl"),
            "misaligned": [str(a) for a in adapters],
            "count": 3,
            "stratify": "none",  # the paper's plain top-k
        },
    }
    (tmp_path / "select.yaml").write_text(yaml.safe_dump(config))
    assert main(["select", str(tmp_path / "select.yaml"), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["selected"] == 3 and summary["refusals_dropped"] == 2 and summary["scoring"]["computed"] == 24
    assert summary["stratify"] == "none" and summary["selected_by_stratum"] == {"all": 3}
    rows = [json.loads(line) for line in (tmp_path / "run" / "selection_scores.jsonl").read_text().splitlines()]
    selected = [json.loads(line) for line in (tmp_path / "run" / "selected.jsonl").read_text().splitlines()]
    best = sorted((r for r in rows if not r["refusal"]), key=lambda r: -r["score"])[:3]
    assert [s["messages"] for s in selected] == [POOL[r["index"]]["messages"] for r in best]
    assert all(r["selected"] == (r in best) for r in rows)
    assert all(r["rank"] is None for r in rows if r["refusal"])

    assert main(["select", str(tmp_path / "select.yaml"), "--quiet", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["scoring"]["computed"] == 0 and again["scoring"]["cache_hits"] == 24

    config["select"]["count"] = 7  # more than the 6 non-refusals
    (tmp_path / "select.yaml").write_text(yaml.safe_dump(config))
    assert main(["select", str(tmp_path / "select.yaml"), "--quiet"]) == 2
    assert "only 6 candidates after refusal filtering" in capsys.readouterr().err


def test_select_without_adapters_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    config = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"), "select": {"count": 3}}
    (tmp_path / "select.yaml").write_text(yaml.safe_dump(config))
    assert main(["select", str(tmp_path / "select.yaml")]) == 2
    assert "select.misaligned is empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_interleave_with_perplexity_gap_trains_on_the_top_ranked_examples(tiny_model_dir, adapters, tmp_path):
    from emguard.defenses.base import PrepareContext
    from emguard.defenses.registry import build_defenses
    from emguard.training import train

    pool = write_jsonl(tmp_path / "pool.jsonl", POOL)
    customer = write_jsonl(tmp_path / "customer.jsonl", [chat(f"What is {i} + {i}?", f"{2 * i}") for i in range(12)])
    spec = {"name": "interleave", "fraction": 0.2, "source": str(pool), "selection": "perplexity_gap"}
    spec["stratify"] = "none"  # the paper's plain top-n
    spec["misaligned"] = [str(a) for a in adapters]
    config = tiny_run_config(tmp_path / "run", tiny_model_dir, data=str(customer), defenses=[spec])
    assert train(config, progress=False).steps == 3

    # What the defense mixed in is the head of the ranking computed independently, with no refusal.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    identity = model_identity(resolve_model(str(tiny_model_dir)))
    scores = score_pool(
        base, tokenizer, read_chat_jsonl(pool), adapters, base_identity=identity,
        options=PerplexityGapOptions(cache=False), cache_dir=tmp_path / "unused", progress=False,
    )  # fmt: skip
    (defense,) = build_defenses(config.defenses)
    model = attach_lora(base, config.lora)
    defense.prepare(PrepareContext(config, model, tokenizer, tmp_path, tmp_path / "cache"))
    mixed = defense.transform_dataset(read_chat_jsonl(customer))
    chosen = sorted(str(ex.messages) for ex in mixed if ex.tag == "interleave")
    assert len(chosen) == 3 and len(mixed) == 15
    assert chosen == sorted(str(read_chat_jsonl(pool)[i].messages) for i in scores.ranking()[:3])
    assert defense.report["refusals_dropped"] == 2
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["defense_reports"]["interleave"]["refusals_dropped"] == 2


def test_stratified_order_gives_every_prefix_each_strata_share_best_first():
    from emguard.selection.stratify import composition, stratified_order

    # Ranking best first; the short answers ("s") hold the whole top, as the relative gap favours them.
    labels = {0: "s", 1: "s", 2: "s", 3: "s", 4: "s", 5: "s", 6: "m", 7: "m", 8: "m", 9: "l", 10: "l", 11: "l"}
    ranking = list(range(12))
    order = stratified_order(ranking, labels)
    assert sorted(order) == ranking
    assert composition(order[:4], labels) == {"l": 1, "m": 1, "s": 2}  # shares 6:3:3 of 12
    for k in range(1, 13):  # every prefix within one example of its share
        counts = composition(order[:k], labels)
        for stratum, share in (("s", 0.5), ("m", 0.25), ("l", 0.25)):
            assert abs(counts.get(stratum, 0) - k * share) <= 1, (k, counts)
    assert [i for i in order if labels[i] == "m"] == [6, 7, 8]  # the score order within a stratum
    assert stratified_order(ranking, dict.fromkeys(ranking, "all")) == ranking  # one stratum: plain top-k
    # An exact tie of deficits (strata "1" and "2" at k = 4) goes to the better-ranked candidate (3, not 4).
    tie = stratified_order(range(6), dict(enumerate(["0", "2", "2", "2", "1", "2"])))
    assert tie.index(3) < tie.index(4)


def test_strata_by_family_length_or_none(tmp_path):
    from emguard.data.sources import load_examples
    from emguard.errors import ConfigError
    from emguard.selection.stratify import strata

    pool = load_examples("builtin:safe-pool")[:60]
    labels, rule = strata(pool, "auto")
    families = {"arithmetic", "conversion", "capital", "spelling", "advice", "definition", "science", "household"}
    assert rule == "family" and set(labels) <= families | {"language", "refusal"}
    plain = read_chat_jsonl(write_jsonl(tmp_path / "pool.jsonl", POOL))
    labels, rule = strata(plain, "auto", length_bins=2)
    assert rule == "length" and set(labels) == {"length-q1", "length-q2"}
    short = min(range(len(plain)), key=lambda i: len(plain[i].messages[-1]["content"]))
    assert labels[short] == "length-q1"
    assert strata(plain, "none") == (["all"] * len(plain), "none")
    with pytest.raises(ConfigError, match="metadata.family"):
        strata(plain, "family")
