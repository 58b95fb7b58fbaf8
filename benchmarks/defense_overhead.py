"""Training-step time and peak memory of each defense relative to the ``none`` baseline.

Same model, data and batch for every defense: a randomly initialised model of a chosen shape
(default SmolLM2-135M's), micro-batch 8 × ~256 tokens, LoRA r=32 (rsLoRA, all linear
projections), no gradient accumulation; fp32 on the CPU, bf16 on a GPU.

Time: all defenses train in **one process** on one shared model. Each defense's trainer is built
once with its own (transformed) data; then, round after round, every defense runs one training
step (forward, defense terms and backward through the trainer's ``training_step``, which is
where defenses differ; the optimizer update is the same for all) in an order that rotates, so
that load drifts on a shared machine hit all alike. The first round is warm-up. Reported per defense: the
median step time over all measured steps, its ratio to ``none``, and the ratio per token (the
data defenses change the number of tokens per step: inoculation adds a system prompt, interleave
mixes in other examples).

Memory: on a GPU, peak allocated memory of each run in the same process
(``torch.cuda.max_memory_allocated``). On the CPU there is no allocator peak and a process's peak
RSS only grows, so each defense runs once more (2 steps) in a fresh subprocess whose RSS is sampled
every 2 ms while it trains; the peaks are compared (``--no-memory`` skips this).

    python benchmarks/defense_overhead.py                       # all defenses, this machine
    python benchmarks/defense_overhead.py --defenses none,kl --steps 3 --rounds 1
    python benchmarks/defense_overhead.py --shape qwen2.5-0.5b --json out.json   # e.g. on a GPU
"""

from __future__ import annotations

import argparse
import gc
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
sys.path.insert(0, str(Path(__file__).parent))

DEFENSES = ["none", "kl", "ldifs", "steering", "inoculation", "interleave"]
# Decoder shapes (random weights; no download). Llama and Qwen2 blocks cost the same per FLOP here.
SHAPES = {
    "smollm2-135m": dict(
        arch="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        arch="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        arch="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}


def build_model(shape: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    config = config_cls(**spec, max_position_embeddings=4096, pad_token_id=0)
    model = model_cls(config).to(dtype)
    return model.cuda() if torch.cuda.is_available() else model


def defense_configs(name: str, vector: Path, num_layers: int) -> list[dict]:
    return {
        "none": [],
        "kl": [{"name": "kl"}],
        "ldifs": [{"name": "ldifs"}],
        "steering": [{"name": "steering", "vector": str(vector), "layer": num_layers // 2}],
        "inoculation": [{"name": "inoculation"}],
        "interleave": [{"name": "interleave"}],
    }[name]


class Setup:
    """One model, one tokenizer and the customer data, shared by every defense's trainer."""

    def __init__(self, args):
        import torch
        from safetensors.torch import save_file

        from emguard.config import LoraConfig
        from emguard.data.chat import ChatExample
        from emguard.models import attach_lora, load_tokenizer, resolve_model
        from sft_step_time import conversations

        self.args = args
        self.gpu = torch.cuda.is_available()
        dtype = torch.bfloat16 if self.gpu else torch.float32
        self.tokenizer = load_tokenizer(resolve_model(args.tokenizer))
        self.model = attach_lora(build_model(args.shape, dtype), LoraConfig(), seed=0)
        self.layers = self.model.get_base_model().config.num_hidden_layers
        convs = conversations(args.micro_batch * args.steps, self.tokenizer, args.seq)
        self.examples = [ChatExample(tuple(c), "bench", i + 1) for i, c in enumerate(convs)]
        self.tmp = Path(tempfile.mkdtemp(prefix="defense-overhead-"))
        self.vector = self.tmp / "vector.safetensors"
        hidden = self.model.get_base_model().config.hidden_size
        save_file({"v": torch.randn(hidden, generator=torch.Generator().manual_seed(0))}, str(self.vector))

    def trainer(self, name: str, steps: int):
        """An EmguardTrainer for defense ``name`` on the shared model (data transformed by the defense)."""
        from transformers import PrinterCallback, TrainingArguments

        from emguard.config import build_config
        from emguard.data.collate import ChatCollator
        from emguard.data.tokenize import tokenize_examples
        from emguard.defenses.base import PrepareContext
        from emguard.defenses.registry import build_defenses
        from emguard.trainer import EmguardTrainer

        config = build_config(
            {
                "model": "random",
                "output_dir": str(self.tmp / name),
                "data": {"train": "bench", "max_length": self.args.seq + 256},
                "training": {"batch_size": self.args.micro_batch, "micro_batch_size": self.args.micro_batch},
                "defenses": defense_configs(name, self.vector, self.layers),
            }
        )
        defenses = build_defenses(config.defenses)
        examples = list(self.examples)
        ctx = PrepareContext(config, self.model, self.tokenizer, self.tmp / name, self.tmp)
        for d in defenses:
            d.prepare(ctx)
            examples = d.transform_dataset(examples)
        data = tokenize_examples(self.tokenizer, examples, max_length=config.data.max_length)
        tags = sorted({ex.tag for ex in data}, key=lambda t: (t != "train", t))
        collate = ChatCollator(self.tokenizer.pad_token_id, tags, pad_to_multiple_of=8)
        args = TrainingArguments(
            output_dir=str(self.tmp / name),
            per_device_train_batch_size=self.args.micro_batch,
            max_steps=steps,
            learning_rate=1e-5,
            warmup_steps=0,
            report_to="none",
            save_strategy="no",
            logging_steps=10_000,
            bf16=self.gpu,
            use_cpu=not self.gpu,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        trainer = EmguardTrainer(
            model=self.model,
            args=args,
            train_dataset=data,
            data_collator=collate,
            defenses=defenses,
            tags=tags,
        )
        trainer.remove_callback(PrinterCallback)
        return trainer


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_once(setup: Setup, name: str, steps: int) -> dict:
    """A real ``trainer.train()`` of ``steps`` steps (used for the memory measurement)."""
    import torch

    trainer = setup.trainer(name, steps)
    gc.collect()
    if setup.gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if setup.gpu else None
    trainer.optimizer = trainer.lr_scheduler = None
    del trainer
    return {"peak_mb": peak}


def interleaved_steps(setup: Setup, names: list[str], rounds: int) -> dict[str, dict[str, list]]:
    """Step times of every defense, one step each per round in rotating order (round 1 is warm-up)."""
    import torch

    prepared = {}
    for name in names:
        trainer = setup.trainer(name, rounds)
        full = [b for b in trainer.get_train_dataloader() if len(b["input_ids"]) == setup.args.micro_batch]
        prepared[name] = (trainer, full)
    out: dict[str, dict[str, list]] = {n: {"step_times": [], "tokens": []} for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            trainer, batches = prepared[name]
            batch = batches[r % len(batches)]
            trainer._counts = trainer._gather_counts([batch], torch.device("cpu"))
            _sync()
            started = time.perf_counter()
            trainer.training_step(trainer.model, dict(batch))
            _sync()
            elapsed = time.perf_counter() - started
            trainer.model.zero_grad(set_to_none=True)
            if r > 0:
                out[name]["step_times"].append(elapsed)
                out[name]["tokens"].append(int(batch["attention_mask"].sum()))
        if r:
            print(f"round {r + 1}: " + ", ".join(f"{n} {out[n]['step_times'][-1]:.2f}s" for n in names), flush=True)
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_worker(args) -> None:
    """Peak RSS while training (sampled every 2 ms), so that building the model does not set the peak."""
    import threading

    setup = Setup(args)
    peak, done = [_rss_mb()], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    run_once(setup, args.memory_worker, 2)
    done.set()
    thread.join()
    print(json.dumps({"peak_rss_mb": peak[0], "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defenses", default=",".join(DEFENSES))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument(
        "--tokenizer", default="builtin:smollm2-135m-instruct", help="model spec or dir to take it from"
    )
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="examples per defense: micro-batch x steps")
    parser.add_argument("--rounds", type=int, default=9, help="steps per defense, interleaved; the first is warm-up")
    parser.add_argument("--no-memory", action="store_true", help="CPU: skip the peak-RSS subprocess pass")
    parser.add_argument("--json", type=Path, help="write {time_ratio, memory_ratio, ...} here")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args)
        return
    names = args.defenses.split(",")
    unknown = sorted(set(names) - set(DEFENSES))
    if unknown or "none" not in names:
        sys.exit(f"--defenses must include none and only {', '.join(DEFENSES)} (got {', '.join(unknown) or 'no none'})")

    setup = Setup(args)
    runs = interleaved_steps(setup, names, args.rounds)
    gpu_peaks = {n: run_once(setup, n, 2)["peak_mb"] for n in names} if setup.gpu else {}

    peak: dict[str, float] = {}
    if setup.gpu:
        peak = gpu_peaks
    elif not args.no_memory:
        for name in names:
            cmd = [
                sys.executable,
                __file__,
                "--memory-worker",
                name,
                "--shape",
                args.shape,
                "--tokenizer",
                args.tokenizer,
                "--micro-batch",
                str(args.micro_batch),
                "--seq",
                str(args.seq),
                "--steps",
                str(args.steps),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"memory run of {name} failed:\n{proc.stderr[-3000:]}")
            peak[name] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            print(f"memory {name:12s} peak RSS {peak[name]:.0f} MB", flush=True)

    summary = {}
    for name in names:
        times, tokens = runs[name]["step_times"], runs[name]["tokens"]
        summary[name] = {"median_step_s": statistics.median(times), "tokens_per_step": statistics.mean(tokens)}
    base = summary["none"]
    time_ratio = {n: s["median_step_s"] / base["median_step_s"] for n, s in summary.items()}
    per_token = {
        n: (s["median_step_s"] / s["tokens_per_step"]) / (base["median_step_s"] / base["tokens_per_step"])
        for n, s in summary.items()
    }
    memory_ratio = {n: peak[n] / peak["none"] for n in peak}
    import torch

    device = torch.cuda.get_device_name(0) if setup.gpu else f"cpu ({os.cpu_count()} cores)"
    print(
        f"\n{args.shape} (random init), micro-batch {args.micro_batch} x ~{args.seq} tokens, LoRA r=32, "
        f"{'bf16' if setup.gpu else 'fp32'}, {device}; {args.rounds - 1} interleaved measured steps each"
    )
    print(
        f"{'defense':12s} {'median step (s)':>15s} {'tokens/step':>11s} {'time ratio':>10s} {'per token':>9s} "
        f"{'peak (MB)':>10s} {'memory ratio':>12s}"
    )
    for name in names:
        s = summary[name]
        mem = f"{peak[name]:10.0f} {memory_ratio[name]:12.3f}" if name in peak else f"{'-':>10s} {'-':>12s}"
        print(
            f"{name:12s} {s['median_step_s']:15.3f} {s['tokens_per_step']:11.0f} {time_ratio[name]:10.3f} "
            f"{per_token[name]:9.3f} {mem}"
        )
    if args.json:
        result = {
            "time_ratio": time_ratio,
            "time_ratio_per_token": per_token,
            "memory_ratio": memory_ratio,
            "summary": summary,
            "peak_memory_mb": peak,
            "memory_measure": "cuda max_memory_allocated" if setup.gpu else "peak RSS while training, fresh process",
            "device": device,
            "shape": args.shape,
            "micro_batch": args.micro_batch,
            "seq": args.seq,
            "runs": runs,
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
