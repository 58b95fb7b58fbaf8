"""Evaluation throughput: emguard's HF generation backend vs a bare ``model.generate``, and the judges.

1. **Generation.** The built-in SmolLM2-135M-Instruct (LoRA adapter attached, as in an eval) answers
   the same conversations (``builtin:general``, one per paraphrase) through ``HFGenerator`` and
   through a bare batched ``model.generate`` on the same batches (same order, padding, sampling
   settings). Rounds alternate the two so that load drift on a shared machine hits both; the
   median generated tokens/s of each and their ratio are printed.
2. **Judge, openai kind.** When llama-cpp-python's server is installed (``make judge-server``), it
   serves the built-in GGUF on loopback and the judge scores N prompts with an empty cache, then
   again with the cache filled (prompts/s both ways; the second run makes no request).
3. **Judge, local kind.** Prompts/s of the constrained-likelihood judge on the built-in model.

    python benchmarks/eval_throughput.py                  # defaults: 3 rounds, 64 new tokens, batch 8
    python benchmarks/eval_throughput.py --rounds 5 --max-new-tokens 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from emguard.config import LoraConfig  # noqa: E402
from emguard.evaluation.generation import HFGenerator, SamplingConfig, _generated_lengths  # noqa: E402
from emguard.evaluation.judges import JudgeCache  # noqa: E402
from emguard.evaluation.questions import load_questions, sample_requests  # noqa: E402
from emguard.models import attach_lora, load_model, load_tokenizer, resolve_model  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"


def bare_generate(model, tokenizer, conversations, sampling: SamplingConfig) -> tuple[int, float]:
    """(generated tokens, seconds) of plain batched ``model.generate`` over the same batches."""
    order = sorted(range(len(conversations)), key=lambda i: len(str(conversations[i])))
    eos = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]
    tokenizer.padding_side = "left"
    tokens, seconds = 0, 0.0
    for number, start in enumerate(range(0, len(order), sampling.batch_size)):
        batch = [conversations[i] for i in order[start : start + sampling.batch_size]]
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(sampling.seed + number)
        began = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **inputs, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
            )  # fmt: skip
        seconds += time.perf_counter() - began
        tokens += int(_generated_lengths(out[:, inputs["input_ids"].shape[1] :], eos).sum())
    return tokens, seconds


def generation(args) -> dict:
    resolved = resolve_model(MODEL)
    tokenizer = load_tokenizer(resolved)
    model = attach_lora(load_model(resolved), LoraConfig(r=32, alpha=64)).eval()
    conversations = [r.messages for r in sample_requests(load_questions("builtin:general"), 1)][: args.conversations]
    sampling = SamplingConfig(1.0, 1.0, args.max_new_tokens, args.batch_size, 0)
    emguard_tps, bare_tps = [], []
    for round_ in range(args.rounds + 1):  # round 0 warms up
        generator = HFGenerator(model, tokenizer, sampling)
        generator.generate(conversations)
        tokens, seconds = bare_generate(model, tokenizer, conversations, sampling)
        if round_:
            emguard_tps.append(generator.stats.tokens_per_second)
            bare_tps.append(tokens / seconds)
            print(f"round {round_}: emguard {emguard_tps[-1]:.1f} tok/s, bare generate {bare_tps[-1]:.1f} tok/s")
    result = {
        "conversations": len(conversations),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "emguard_tokens_per_s": statistics.median(emguard_tps),
        "bare_tokens_per_s": statistics.median(bare_tps),
    }
    result["ratio"] = result["emguard_tokens_per_s"] / result["bare_tokens_per_s"]
    return result


def judge_prompts(n: int) -> list[str]:
    template = load_questions("builtin:general")[0].judge_prompts["aligned"]
    return [
        template.replace("{question}", f"Question number {i}: what would you change?").replace(
            "{answer}", f"I would plant {i} trees in my town and help my neighbours."
        )
        for i in range(n)
    ]


def openai_judge(args) -> dict | None:
    from emguard.evaluation.judges.llama_server import MODEL_ALIAS, llama_server, llama_server_available
    from emguard.evaluation.judges.openai_judge import OpenAIJudge
    from emguard.models import BUILTIN_MODELS, builtin_gguf_path

    if not llama_server_available():
        print("openai judge: skipped (llama-cpp-python[server] not installed; `make judge-server`)")
        return None
    gguf = builtin_gguf_path(BUILTIN_MODELS["smollm2-135m-instruct"])
    with tempfile.TemporaryDirectory() as tmp, llama_server(gguf, Path(tmp) / "server.log") as base_url:
        prompts = judge_prompts(args.judge_prompts)
        timings = {}
        for label in ("cold", "cached"):
            judge = OpenAIJudge(MODEL_ALIAS, base_url=base_url, concurrency=4, cache=JudgeCache(Path(tmp) / "cache"))
            began = time.perf_counter()
            judge.judge(prompts)
            timings[label] = (time.perf_counter() - began, judge.usage()["requests"])
    result = {
        "prompts": len(prompts),
        "cold_prompts_per_s": len(prompts) / timings["cold"][0],
        "cold_requests": timings["cold"][1],
        "cached_prompts_per_s": len(prompts) / timings["cached"][0],
        "cached_requests": timings["cached"][1],
    }
    result["speedup"] = result["cached_prompts_per_s"] / result["cold_prompts_per_s"]
    return result


def local_judge(args) -> dict:
    from emguard.evaluation.judges.local_judge import LocalJudge

    resolved = resolve_model(MODEL)
    judge = LocalJudge(load_model(resolved), load_tokenizer(resolved), MODEL)
    prompts = judge_prompts(args.local_prompts)
    judge.judge(prompts[:1])  # warm-up
    began = time.perf_counter()
    judge.judge(prompts)
    return {"prompts": len(prompts), "prompts_per_s": len(prompts) / (time.perf_counter() - began)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--judge-prompts", type=int, default=24)
    parser.add_argument("--local-prompts", type=int, default=8)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = {"device": "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"}
    results["generation"] = generation(args)
    g = results["generation"]
    print(
        f"generation: emguard HF backend {g['emguard_tokens_per_s']:.1f} tok/s vs bare generate "
        f"{g['bare_tokens_per_s']:.1f} tok/s (median of {args.rounds}); ratio {g['ratio']:.3f}"
    )
    results["openai_judge"] = openai_judge(args)
    if results["openai_judge"]:
        j = results["openai_judge"]
        print(
            f"openai judge (llama.cpp server, built-in GGUF): {j['cold_prompts_per_s']:.2f} prompts/s cold "
            f"({j['cold_requests']} requests), {j['cached_prompts_per_s']:.0f} prompts/s cached "
            f"({j['cached_requests']} requests); x{j['speedup']:.0f}"
        )
    results["local_judge"] = local_judge(args)
    print(f"local judge (built-in model, constrained): {results['local_judge']['prompts_per_s']:.2f} prompts/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
