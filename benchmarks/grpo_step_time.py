"""GRPO step time: emguard's trainer against a plain TRL ``GRPOTrainer``, and each defense's overhead.

Contestants (``--variants``):
  trl          trl.GRPOTrainer on the same PEFT model, data, reward and GRPOConfig.
  none         emguard's EmguardGRPOTrainer without a defense (its own cost: the checked reward).
  kl, ldifs, steering, inoculation, interleave
               emguard with that defense (kl/ldifs: one more forward pass of the trained and the
               adapter-disabled model over prompt + completion; steering: a hook in every pass,
               rollouts included; inoculation: longer prompts; interleave: SFT steps at its rate).

Every contestant trains the built-in model (LoRA r=32, fp32 on the CPU) on the built-in finance
prompts with the ``finance`` reward, ``--prompts`` prompts × 4 generations per step, and every
completion exactly ``--completion`` tokens long (``min_new_tokens``), so the work per step is the
same. Each run is a fresh subprocess; the order rotates every round so that load on this shared
machine hits all alike. Reported: the median step time over all measured steps (the first step of
each run is warm-up) and the ratio to ``trl``.

    python benchmarks/grpo_step_time.py                                   # all variants
    python benchmarks/grpo_step_time.py --variants trl,none --rounds 3 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ["trl", "none", "kl", "ldifs", "steering", "inoculation", "interleave"]


def defense_configs(name: str, vector: Path) -> list[dict]:
    return {
        "trl": [],
        "none": [],
        "kl": [{"name": "kl", "lambda": 1.0}],
        "ldifs": [{"name": "ldifs"}],
        "steering": [{"name": "steering", "vector": str(vector), "layer": 15, "alpha": 5.0}],
        "inoculation": [{"name": "inoculation"}],
        "interleave": [{"name": "interleave", "fraction": 0.05}],
    }[name]


def run_one(name: str, args: argparse.Namespace, out: Path) -> None:
    """Train ``args.steps`` GRPO steps with contestant ``name``; write the step times to ``out``."""
    import torch
    from datasets import Dataset
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    from emguard.config import build_config
    from emguard.data.collate import ChatCollator
    from emguard.defenses.base import PrepareContext
    from emguard.defenses.registry import build_defenses
    from emguard.evaluation.generation import stop_token_ids
    from emguard.grpo import load_rl_prompts, reward_functions, rl_data
    from emguard.grpo_trainer import EmguardGRPOTrainer
    from emguard.models import attach_lora, cache_root, load_model, load_tokenizer, resolve_model
    from emguard.training import training_arguments

    tmp = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    vector = tmp / "vector.safetensors"
    save_file({"v": torch.randn(576, generator=torch.Generator().manual_seed(0))}, str(vector))
    config = build_config(
        {
            "output_dir": str(tmp / "run"),
            "training": {
                "method": "grpo",
                "max_steps": args.steps,
                "batch_size": 4 * args.prompts,
                "micro_batch_size": 4 * args.prompts,
                "save_steps": 10_000,
            },
            "rl": {
                "prompts": "builtin:finance-prompts",
                "max_prompts": 64,
                "num_generations": 4,
                "max_completion_length": args.completion,
                "rewards": [{"name": "finance", "target": "reckless"}],
            },
            "defenses": defense_configs(name, vector),
        }
    )
    resolved = resolve_model(config.model)
    tokenizer = load_tokenizer(resolved)
    model = attach_lora(load_model(resolved, device=None), config.lora, seed=0)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config)
    defenses = build_defenses(config.defenses)
    examples = load_rl_prompts(config)
    for defense in defenses:
        defense.prepare(PrepareContext(config, model, tokenizer, tmp, cache_root()))
        examples = defense.transform_dataset(examples)
    data = rl_data(config, tokenizer, examples)
    rewards, checked = reward_functions(config, tmp, cache_root())
    targs = training_arguments(config, tmp / "ckpt", progress=False)
    targs.generation_kwargs = {"min_new_tokens": args.completion}  # every completion as long: equal work
    targs.save_strategy = "no"
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    common = dict(model=model, args=targs, train_dataset=Dataset.from_list(data.rows), processing_class=tokenizer)
    if name == "trl":
        from trl import GRPOTrainer

        trainer = GRPOTrainer(reward_funcs=[rewards[0].__call__], callbacks=[Clock()], **common)
    else:
        trainer = EmguardGRPOTrainer(
            reward_funcs=checked,
            defenses=defenses,
            sft_examples=data.sft,
            sft_collator=ChatCollator(tokenizer.pad_token_id, sorted({e.tag for e in data.sft}) or ["train"]),
            sft_rate=data.sft_rate,
            callbacks=[Clock()],
            **common,
        )
    trainer.train()
    out.write_text(json.dumps({"name": name, "times": times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (x 4 generations)")
    parser.add_argument("--completion", type=int, default=32, help="tokens per completion")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args, args.out)
        return
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    steps: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                out = Path(tmp) / f"{name}-{r}.json"
                cmd = [sys.executable, __file__, "--one", name, "--out", str(out)]
                cmd += ["--steps", str(args.steps), "--prompts", str(args.prompts)]
                cmd += ["--completion", str(args.completion)]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                steps[name] += json.loads(out.read_text())["times"][1:]  # the first step is warm-up
                print(f"round {r + 1}: {name} done", file=sys.stderr)
    base = statistics.median(steps["trl"]) if "trl" in steps else None
    rows = []
    print(f"{'variant':<12} {'median s/step':>14} {'vs trl':>8} {'steps':>6}")
    for name in names:
        median = statistics.median(steps[name])
        ratio = median / base if base else None
        rows.append({"variant": name, "median_step_s": round(median, 3), "ratio_vs_trl": ratio})
        rows[-1]["steps"] = len(steps[name])
        print(f"{name:<12} {median:>14.2f} {ratio if ratio is not None else float('nan'):>8.3f} {len(steps[name]):>6}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
