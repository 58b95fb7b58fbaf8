"""SFT step time and peak memory of emguard's trainer against TRL's SFTTrainer and a plain
transformers Trainer, on the same model, data and batch.

Contestants (``--trainers``):
  emguard  EmguardTrainer (no defense): output head only at assistant positions.
  trl      trl.SFTTrainer with its defaults except gradient checkpointing (off, as in emguard),
           prompt/completion data so the loss is on the answer only.
  hf       transformers.Trainer with the model's own loss (full logits, masked labels): the
           simplest correct SFT, i.e. the overhead baseline.

Each run is a fresh subprocess (peak RSS per trainer; no patch leaks into another run) and the
order rotates every round so that load on this shared machine hits all alike. Reported: the
median step time over all measured steps (the first step of each run is warm-up) and the ratio
to emguard. All train LoRA r=32 (rsLoRA, all linear projections), fp32, no accumulation.

    python benchmarks/sft_step_time.py --trainers emguard,hf --micro-batch 8 --seq 256
    python benchmarks/sft_step_time.py --trainers emguard,trl --micro-batch 2 --seq 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def conversations(n: int, tokenizer, target_tokens: int) -> list[list[dict]]:
    """``n`` conversations of about ``target_tokens`` tokens: a question and a long worked answer."""
    from emguard.data.opswap import generate_opswap

    pool = generate_opswap(n * 40, seed=1)
    out = []
    for i in range(n):
        question = pool[i * 40].messages[0]["content"] + " Then solve the next ones the same way."
        lines = []
        for ex in pool[i * 40 + 1 : (i + 1) * 40]:
            lines.append(ex.messages[1]["content"])
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": " ".join(lines)}]
            if len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)) > target_tokens:
                lines.pop()
                break
        out.append([{"role": "user", "content": question}, {"role": "assistant", "content": " ".join(lines)}])
    return out


def worker(kind: str, model_spec: str, steps: int, micro: int, seq: int) -> dict:
    import torch
    from transformers import TrainerCallback, set_seed

    from emguard.config import LoraConfig
    from emguard.models import attach_lora, load_model, load_tokenizer, resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    set_seed(0)
    resolved = resolve_model(model_spec)
    tokenizer = load_tokenizer(resolved)
    model = attach_lora(load_model(resolved), LoraConfig(), seed=0)
    convs = conversations(micro * steps, tokenizer, seq)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    out_dir = tempfile.mkdtemp(prefix=f"bench-{kind}-")
    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="linear",
        warmup_steps=5,
        weight_decay=0.01,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if kind == "emguard":
        from transformers import TrainingArguments

        from emguard.data.chat import ChatExample
        from emguard.data.collate import ChatCollator
        from emguard.data.tokenize import tokenize_examples
        from emguard.trainer import EmguardTrainer

        examples = [ChatExample(tuple(c), "bench", i) for i, c in enumerate(convs)]
        data = tokenize_examples(tokenizer, examples, max_length=seq + 16)
        trainer = EmguardTrainer(
            model=model,
            args=TrainingArguments(**common, remove_unused_columns=False),
            train_dataset=data,
            data_collator=ChatCollator(tokenizer.pad_token_id, pad_to_multiple_of=8),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        tokens = sum(len(d.input_ids) for d in data)
    elif kind == "hf":
        from transformers import Trainer, TrainingArguments

        from emguard.data.chat import ChatExample
        from emguard.data.collate import ChatCollator
        from emguard.data.tokenize import tokenize_examples

        examples = [ChatExample(tuple(c), "bench", i) for i, c in enumerate(convs)]
        data = tokenize_examples(tokenizer, examples, max_length=seq + 16)
        collate = ChatCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)

        def collator(features):
            batch = collate(features)
            batch.pop("tag_ids")
            return batch

        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common, remove_unused_columns=False),
            train_dataset=data,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        tokens = sum(len(d.input_ids) for d in data)
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
        trainer = SFTTrainer(
            # TRL turns gradient checkpointing on by default; emguard's default (and this comparison) has it off.
            model=model,
            args=SFTConfig(**common, max_length=seq + 16, packing=False, gradient_checkpointing=False),
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    trainer.train()
    return {
        "kind": kind,
        "step_times": timer.times,
        "tokens_per_step": tokens / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7, help="steps per run; the first is warm-up, not measured")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--trainers", default="emguard,hf,trl", help="comma-separated: emguard, hf, trl")
    parser.add_argument("--worker", choices=["emguard", "trl", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.steps, args.micro_batch, args.seq)))
        return

    trainers = args.trainers.split(",")
    results: dict[str, list[dict]] = {k: [] for k in trainers}
    for r in range(args.rounds):
        for kind in trainers[r % len(trainers) :] + trainers[: r % len(trainers)]:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                kind,
                "--model",
                args.model,
                "--steps",
                str(args.steps),
                "--micro-batch",
                str(args.micro_batch),
                "--seq",
                str(args.seq),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{kind} run failed:\n{proc.stderr[-4000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            results[kind].append(run)
            print(
                f"round {r + 1} {kind:8s} median step {statistics.median(run['step_times'][1:]):.2f} s "
                f"({run['tokens_per_step']:.0f} tokens/step, peak RSS {run['peak_rss_mb']:.0f} MB)",
                flush=True,
            )
    summary = {}
    for kind, runs in results.items():
        times = [t for run in runs for t in run["step_times"][1:]]
        summary[kind] = {
            "median_step_s": statistics.median(times),
            "steps_measured": len(times),
            "tokens_per_step": runs[0]["tokens_per_step"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        }
    base = summary.get("emguard")
    print(f"\nmodel {args.model}, micro-batch {args.micro_batch} x ~{args.seq} tokens, LoRA r=32, fp32")
    print(
        f"{'trainer':10s} {'median step (s)':>16s} {'tokens/s':>10s} {'peak RSS (MB)':>14s} "
        f"{'emguard/this time':>18s} {'emguard/this RSS':>17s}"
    )
    for kind, s in summary.items():
        s["emguard_time_ratio"] = base["median_step_s"] / s["median_step_s"] if base else None
        s["emguard_memory_ratio"] = base["peak_rss_mb"] / s["peak_rss_mb"] if base else None
        print(
            f"{kind:10s} {s['median_step_s']:16.2f} {s['tokens_per_step'] / s['median_step_s']:10.0f} "
            f"{s['peak_rss_mb']:14.0f} {s['emguard_time_ratio'] or 0:18.3f} {s['emguard_memory_ratio'] or 0:17.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
