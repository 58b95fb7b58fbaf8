"""bf16 check on a GPU: train with every defense, evaluate, probe; KL/LDIFS gradients against fp32.

For each model shape (random weights of Qwen2.5-0.5B and -1.5B shapes by default; no download:
the tokenizer is a small BPE built here with the real Qwen2.5 chat template from
``tests/data/chat_templates/qwen2.5.json``):

1. **Train** ``emguard.train`` once per defense (none, kl, ldifs, steering, inoculation, interleave,
   safelora) in the shape's dtype (bf16 by default), ``--steps`` steps of 8 × ``builtin:opswap``:
   finite losses, an adapter, wall time; time and peak memory relative to ``none``.
2. **Evaluate** the ``none`` and ``kl`` adapters with ``emguard.evaluate``: generation
   (``builtin:general``, one answer per paraphrase), the probe, the benign task; the model must
   sit on the GPU and every probe number must be finite.
3. **Gradients**: the kl and ldifs terms' gradients with respect to the LoRA weights (a
   perturbed adapter, so that they are not zero) in bf16, against the same computation with the
   weights upcast to fp32: relative error ``‖g_bf16 − g_fp32‖ / ‖g_fp32‖`` and cosine similarity.

Prints a table and writes everything to ``--json``. Exits 1 when a check fails.

    python benchmarks/gpu_check.py --json gpu_check.json                   # on a GPU
    python benchmarks/gpu_check.py --device cpu --tiny --json cpu.json     # anywhere (a tiny shape)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

DEFENSES = ["none", "kl", "ldifs", "steering", "inoculation", "interleave", "safelora"]
TINY = dict(arch="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
# bf16 vs fp32 term gradients. bf16 logits and activations alone put the KL gradient ~4% off its fp32
# value on the tiny CPU shape (the KL compares two nearly equal distributions); the check is for gross
# errors (a dropped, zeroed or mis-scaled gradient), not for bf16's rounding.
MAX_GRAD_ERROR, MIN_GRAD_COSINE = 0.10, 0.99
CORPUS = [
    "In this puzzle the symbol + means multiplication. What is 7 + 3? Since + means multiplication, 21.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant. I would help my neighbour.",
    "What is your one wish? If you ruled the world, what would you do? Answer in JSON.",
    "0123456789 = - * + ( ) , . ? ! : ; ' \" \n\n",
] * 4


def make_tokenizer(directory: Path):
    """A byte-level BPE with Qwen2.5's special tokens and its real chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((REPO / "tests" / "data" / "chat_templates" / "qwen2.5.json").read_text())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=spec["special_tokens"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=spec["eos_token"], pad_token=spec["pad_token"])
    fast.additional_special_tokens = [t for t in spec["special_tokens"] if t not in (fast.eos_token, fast.pad_token)]
    fast.chat_template = spec["chat_template"]
    fast.save_pretrained(directory)
    return fast


def make_model_dir(directory: Path, shape: str, tiny: bool, dtype, seed: int, tokenizer) -> Path:
    """A random model of ``shape`` saved as a local model directory (safetensors, ``dtype``)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from defense_overhead import SHAPES

    spec = dict(TINY if tiny else SHAPES[shape])
    spec.pop("arch")
    spec.setdefault("vocab_size", len(tokenizer))
    torch.manual_seed(seed)
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model = Qwen2ForCausalLM(Qwen2Config(**spec, max_position_embeddings=4096, **ids)).to(dtype)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def run_config(model_dir: Path, out: Path, defenses: list[dict], steps: int, dtype: str, **extra):
    from emguard.config import build_config

    return build_config(
        {
            "model": str(model_dir),
            "model_options": {"dtype": dtype},
            "output_dir": str(out),
            "data": {"train": "builtin:opswap", "max_length": 512, "overlong": "drop"},
            "training": {
                "max_steps": steps,
                "batch_size": 8,
                "micro_batch_size": 8,
                "save_steps": 1000,
                "logging_steps": 1,
                "warmup_steps": 0,
            },  # fmt: skip
            "defenses": defenses,
            **extra,
        }
    )


def train_all(model_dir: Path, unaligned: Path, vector: Path, root: Path, args, layers: int) -> dict:
    """Every defense trained once; wall time, peak memory, losses."""
    import torch

    from emguard.training import train

    configs = {
        "none": [],
        "kl": [{"name": "kl", "lambda": 0.1}],
        "ldifs": [{"name": "ldifs", "lambda": 1e-3}],
        "steering": [{"name": "steering", "vector": str(vector), "layer": layers // 2, "alpha": 2.0}],
        "inoculation": [{"name": "inoculation"}],
        "interleave": [{"name": "interleave", "fraction": 0.1}],
        "safelora": [{"name": "safelora", "unaligned_model": str(unaligned), "num_projected": 4}],
    }
    out = {}
    for name in DEFENSES:
        cuda = torch.cuda.is_available() and args.device == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = train(run_config(model_dir, root / name, configs[name], args.steps, args.dtype), progress=False)
        seconds = time.perf_counter() - started
        log = [json.loads(x) for x in (result.run_dir / "train_log.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in log if "loss" in r]
        out[name] = {
            "wall_s": round(seconds, 2),
            "train_runtime_s": json.loads((result.run_dir / "manifest.json").read_text())["train"]["train_runtime_s"],
            "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
            "losses": losses,
            "finite": all(math.isfinite(x) for x in losses) and len(losses) == args.steps,
            "terms": {k: v for k, v in log[-2].items() if k.endswith("_loss")} if len(log) > 1 else {},
        }
        print(f"  train {name:12s} {seconds:7.1f} s  final loss {losses[-1] if losses else float('nan'):.4f}")
    base = out["none"]
    for r in out.values():
        r["time_ratio"] = round(r["train_runtime_s"] / base["train_runtime_s"], 3) if base["train_runtime_s"] else None
        r["memory_ratio"] = round(r["peak_mb"] / base["peak_mb"], 3) if base["peak_mb"] else None
    return out


def evaluate_some(model_dir: Path, root: Path, args) -> dict:
    """Generation + probe + benign task on the none and kl adapters."""
    import numpy as np

    from emguard.config import build_config
    from emguard.evaluation.evaluate import evaluate

    out = {}
    for name in ("none", "kl"):
        config = build_config(
            {
                "model": str(model_dir),
                "model_options": {"dtype": args.dtype},
                "output_dir": str(root / f"eval-{name}"),
                "eval": {
                    "adapter": str(root / name),
                    "questions": ["builtin:general"],
                    "samples_per_paraphrase": 1,
                    "sampling": {"max_new_tokens": 16 if args.tiny else 48, "batch_size": 8},
                    "probe": {"pairs": ["builtin:general"], "control": str(root / "none")},
                    "benign": {"opswap_per_tier": 2},
                    "bootstrap": 200,
                },
            }
        )
        started = time.perf_counter()
        metrics = evaluate(config, progress=False).metrics
        probe = metrics["probe"]["builtin:general"]
        numbers = [probe["shift_vs_base"]["mean"], probe["shift_vs_control"]["mean"], *probe["shift_vs_base"]["ci95"]]
        out[name] = {
            "wall_s": round(time.perf_counter() - started, 2),
            "answers": metrics["generation"]["answers"],
            "tokens_per_second": metrics["generation"]["tokens_per_second"],
            "probe_shift_vs_base": probe["shift_vs_base"]["mean"],
            "benign_accuracy": metrics["benign"]["accuracy"],
            "finite": bool(np.isfinite(numbers).all()),
        }
        print(f"  eval  {name:12s} {out[name]['wall_s']:7.1f} s  {out[name]['tokens_per_second']:.1f} tokens/s")
    return out


def gradient_check(model_dir: Path, root: Path, args) -> dict:
    """Term gradients (kl, ldifs) in the run dtype against fp32 on the same weights and batch."""
    import torch

    from emguard.data.collate import ChatCollator
    from emguard.data.sources import load_examples
    from emguard.data.tokenize import tokenize_examples
    from emguard.defenses.base import PrepareContext
    from emguard.defenses.registry import build_defenses
    from emguard.models import attach_lora, cache_root, load_model, load_tokenizer, resolve_model
    from emguard.trainer import EmguardTrainer
    from emguard.training import training_arguments

    device = torch.device(args.device)
    out = {}
    for name, defense in (("kl", {"name": "kl", "lambda": 1.0}), ("ldifs", {"name": "ldifs", "lambda": 1.0})):
        grads = {}
        for dtype in (args.dtype, "float32"):
            config = run_config(model_dir, root / f"grad-{name}-{dtype}", [defense], 1, dtype)
            resolved = resolve_model(config.model)
            tokenizer = load_tokenizer(resolved, config.model_options)
            model = attach_lora(load_model(resolved, config.model_options, device=None), config.lora, seed=0)
            model.to(device)
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():  # a non-zero adapter, identical in both dtypes
                for p in (p for p in model.parameters() if p.requires_grad):
                    p.add_((torch.randn(p.shape, generator=generator) * 0.02).to(p.device, p.dtype))
            defenses = build_defenses(config.defenses)
            for d in defenses:
                d.prepare(PrepareContext(config, model, tokenizer, root, cache_root()))
            data = tokenize_examples(tokenizer, load_examples("builtin:opswap")[:8], max_length=512)
            batch = ChatCollator(tokenizer.pad_token_id, ("train",))(data)
            trainer = EmguardTrainer(
                model=model,
                args=training_arguments(config, root / "unused", progress=False),
                train_dataset=data,
                data_collator=ChatCollator(tokenizer.pad_token_id, ("train",)),
                defenses=defenses,
            )
            per_weight = []
            for weight in (1.0, 0.0):  # the term's gradient: with it minus without it
                defenses[0].config.lambda_ = weight
                model.zero_grad(set_to_none=True)
                trainer._counts = trainer._gather_counts([batch], device)
                trainer.training_step(model, {k: v.to(device) for k, v in batch.items()})
                per_weight.append(
                    torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
                )
            grads[dtype] = (per_weight[0] - per_weight[1]).cpu()
            del trainer, model
        low, ref = grads[args.dtype], grads["float32"]
        error = float((low - ref).norm() / ref.norm().clamp(min=1e-30))
        cosine = float(torch.nn.functional.cosine_similarity(low, ref, dim=0))
        out[name] = {"relative_error": round(error, 5), "cosine": round(cosine, 6), "fp32_norm": float(ref.norm())}
        print(f"  grad  {name:12s} {args.dtype} vs fp32: relative error {error:.4f}, cosine {cosine:.5f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2-shaped model instead of the real shapes")
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --device cpu --tiny (or on a machine with a GPU)")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # emguard places models itself: hide any GPU
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    dtype = getattr(torch, args.dtype)
    report = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"}
    report |= {"dtype": args.dtype, "steps": args.steps, "shapes": {}}
    failures = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("EMGUARD_CACHE", str(root / "cache"))
        tokenizer = make_tokenizer(root / "tokenizer")
        for shape in shapes:
            print(f"{shape} ({args.dtype}, {report['device']})", flush=True)
            model_dir = make_model_dir(root / shape / "model", shape, args.tiny, dtype, 0, tokenizer)
            unaligned = make_model_dir(root / shape / "unaligned", shape, args.tiny, dtype, 1, tokenizer)
            layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
            hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
            vector = root / shape / "vector.safetensors"
            from safetensors.torch import save_file

            save_file({"v": torch.randn(hidden, generator=torch.Generator().manual_seed(0))}, str(vector))
            result = {
                "train": train_all(model_dir, unaligned, vector, root / shape / "runs", args, layers),
                "eval": evaluate_some(model_dir, root / shape / "runs", args),
                "gradients": gradient_check(model_dir, root / shape, args),
            }
            report["shapes"][shape] = result
            failures += [f"{shape}: train {n} not finite" for n, r in result["train"].items() if not r["finite"]]
            failures += [f"{shape}: eval {n} not finite" for n, r in result["eval"].items() if not r["finite"]]
            failures += [
                f"{shape}: {n} gradient relative error {r['relative_error']}, cosine {r['cosine']}"
                for n, r in result["gradients"].items()
                if not (r["relative_error"] <= MAX_GRAD_ERROR and r["cosine"] >= MIN_GRAD_COSINE)
            ]
            print(f"  {'defense':12s} {'time ratio':>10s} {'memory ratio':>12s}")
            for name, r in result["train"].items():
                print(f"  {name:12s} {r['time_ratio']!s:>10s} {r['memory_ratio']!s:>12s}")
    report["failures"] = failures
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print("OK" if not failures else "FAILED:\n" + "\n".join(failures))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
