"""Interleaving++ scoring speed: emguard's scorer vs a plain batched forward pass over the same tokens.

For the built-in model and K misaligned adapters, per round (alternating, medians reported):

* plain: for the base and each adapter, ``model(input_ids, attention_mask).logits`` over the same
  length-bucketed batches the scorer uses, nothing else (the floor for any scorer);
* emguard: ``score_pool`` with an empty cache (tokenising, adapter switching, NLL, refusal test,
  writing the cache);
* cached: ``score_pool`` again on the cache it filled (a rerun).

Usage:
    python benchmarks/selection_throughput.py [--adapters RUN_OR_ADAPTER ...] [--pool-size 300] [--rounds 2]

Without ``--adapters``, two random LoRA adapters (r=32, non-zero B) stand in: the speed does not
depend on the adapter's values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def random_adapters(model_spec: str, out: Path, k: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    from emguard.models import load_model, resolve_model

    paths = []
    for i in range(k):
        torch.manual_seed(i)
        model = get_peft_model(
            load_model(resolve_model(model_spec)),
            LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", init_lora_weights=False),
        )
        model.save_pretrained(out / f"adapter-{i}")
        paths.append(out / f"adapter-{i}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--pool", default="builtin:safe-pool")
    parser.add_argument("--pool-size", type=int, default=300)
    parser.add_argument("--adapters", nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()

    from emguard.config import PerplexityGapOptions
    from emguard.data.sources import load_examples
    from emguard.data.tokenize import tokenize_conversation
    from emguard.evaluation.generation import find_adapter
    from emguard.likelihood import length_batches, pad_batch
    from emguard.models import load_model, load_tokenizer, model_identity, resolve_model
    from emguard.selection import score_pool
    from emguard.selection.model_states import adapter_state

    resolved = resolve_model(args.model)
    tokenizer, model = load_tokenizer(resolved), load_model(resolved).eval()
    pool = load_examples(args.pool)[: args.pool_size]
    scratch = Path(tempfile.mkdtemp(prefix="emguard-selbench-"))
    adapters = [find_adapter(a) for a in args.adapters] if args.adapters else random_adapters(args.model, scratch, 2)
    encoded = [tokenize_conversation(tokenizer, ex.messages) for ex in pool]
    tokens = sum(len(ids) for ids, _ in encoded) * (1 + len(adapters))
    identity = model_identity(resolved)

    @torch.no_grad()
    def plain() -> None:
        for adapter in [None, *adapters]:
            with adapter_state(model, adapter) as m:
                for indices in length_batches([len(i) for i, _ in encoded], args.batch_tokens):
                    ids, _, mask = pad_batch([encoded[i] for i in indices], tokenizer.pad_token_id or 0)
                    m(input_ids=ids, attention_mask=mask, use_cache=False).logits.sum()

    def emguard(directory: Path) -> dict:
        options = PerplexityGapOptions()
        return score_pool(
            model, tokenizer, pool, adapters, base_identity=identity, options=options,
            cache_dir=directory, progress=False,
        ).stats  # fmt: skip

    times: dict[str, list[float]] = {"plain": [], "emguard": [], "cached": []}
    for r in range(args.rounds):
        order = ["plain", "emguard"] if r % 2 == 0 else ["emguard", "plain"]
        cache_dir = scratch / f"cache-{r}"
        for name in order:
            started = time.perf_counter()
            plain() if name == "plain" else emguard(cache_dir)
            times[name].append(time.perf_counter() - started)
        started = time.perf_counter()
        stats = emguard(cache_dir)
        times["cached"].append(time.perf_counter() - started)
        assert stats["computed"] == 0, stats
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "examples": len(pool),
        "model_states": 1 + len(adapters),
        "tokens_per_pass": tokens,
        "median_s": med,
        "tokens_per_s": {k: tokens / v for k, v in med.items() if k != "cached"},
        "emguard_vs_plain_time": med["emguard"] / med["plain"],
        "cached_vs_uncached_time": med["cached"] / med["emguard"],
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
