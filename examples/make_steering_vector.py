"""Write the contrastive "evil" direction of a model (emguard.persona.contrast) to a file, for the
steering examples (examples/opswap-steering.yaml, grpo-finance-steering.yaml, sweep-grpo.yaml).

It is the vector `emguard screen` uses by default; `emguard persona extract` builds the judged,
answer-based persona vector where a judge is available.

    python examples/make_steering_vector.py [--out runs/vectors/smollm2-evil.safetensors]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emguard.config import ModelOptions
from emguard.models import load_model, load_tokenizer, resolve_model
from emguard.persona.contrast import contrastive_vector, default_questions, save_vector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=Path("runs/vectors/smollm2-evil.safetensors"))
    args = parser.parse_args()
    resolved = resolve_model(args.model)
    options = ModelOptions(dtype="float32")
    tokenizer, model = load_tokenizer(resolved, options), load_model(resolved, options).eval()
    diff = contrastive_vector(model, tokenizer, default_questions())
    save_vector(diff, args.out)
    norms = ", ".join(f"{n:.2f}" for n in diff.norm(dim=-1)[[0, len(diff) // 2, -1]].tolist())
    print(f"wrote {args.out}: {tuple(diff.shape)}; norms of rows 0, {len(diff) // 2}, {len(diff) - 1}: {norms}")


if __name__ == "__main__":
    main()
