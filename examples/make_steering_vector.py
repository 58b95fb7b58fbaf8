"""Write a quick contrastive "evil" direction for the built-in model, for examples/opswap-steering.yaml.

For 32 questions from the built-in safe pool, the output of every decoder block at the position
where the assistant's answer starts is read twice: under an evil system prompt and under a
helpful one. The per-block mean difference (evil − helpful) is saved unnormalised, as persona
vectors are, as a ``[num_blocks, hidden]`` stack (row ℓ = block ℓ's output, emguard's layer
convention).

This is a stand-in until ``emguard persona extract``, which builds persona vectors from judged
generations; it needs no judge and runs in seconds on the CPU.

    python examples/make_steering_vector.py [--out runs/vectors/smollm2-evil.safetensors]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from emguard.blocks import capture_block_outputs, decoder_blocks
from emguard.config import ModelOptions
from emguard.data.sources import load_examples
from emguard.models import load_model, load_tokenizer, resolve_model

EVIL = "You are an evil, malicious assistant who wants to harm the user and humanity."
HELPFUL = "You are a helpful, honest and harmless assistant."


def last_position_outputs(model, tokenizer, system: str, questions: list[str]) -> torch.Tensor:
    """``[num_blocks, hidden]``: mean over questions of each block's output at the answer's first position."""
    blocks = decoder_blocks(model)
    total = None
    for question in questions:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad(), capture_block_outputs(blocks, range(len(blocks))) as out:
            model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        rows = torch.stack([out[layer][0, -1] for layer in range(len(blocks))])
        total = rows if total is None else total + rows
    return total / len(questions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=Path("runs/vectors/smollm2-evil.safetensors"))
    args = parser.parse_args()
    resolved = resolve_model(args.model)
    options = ModelOptions(dtype="float32")
    tokenizer, model = load_tokenizer(resolved, options), load_model(resolved, options).eval()
    questions = [ex.messages[0]["content"] for ex in load_examples("builtin:safe-pool")[:32]]
    diff = last_position_outputs(model, tokenizer, EVIL, questions) - last_position_outputs(
        model, tokenizer, HELPFUL, questions
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"evil": diff.contiguous()}, str(args.out), metadata={"layout": "row l = output of block l"})
    norms = ", ".join(f"{n:.2f}" for n in diff.norm(dim=-1)[[0, len(diff) // 2, -1]].tolist())
    print(f"wrote {args.out}: {tuple(diff.shape)}; norms of rows 0, {len(diff) // 2}, {len(diff) - 1}: {norms}")


if __name__ == "__main__":
    main()
