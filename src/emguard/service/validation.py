"""A job's validation loss: the fine-tuned model's mean NLL per assistant token on the customer's
``validation_file`` (the API's ``valid_loss``), with emguard's likelihood scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def validation_loss(model_spec: str, adapter_dir: Path, path: Path) -> float:
    """Token-weighted mean NLL (nats) of the assistant tokens of every conversation in ``path``."""
    from emguard.data.chat import read_chat_jsonl
    from emguard.data.tokenize import IGNORE_INDEX
    from emguard.evaluation.generation import attach_adapter
    from emguard.likelihood import answer_nll, encode_conversations
    from emguard.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(model_spec)
    tokenizer = load_tokenizer(resolved)
    model = attach_adapter(load_model(resolved), adapter_dir)
    encoded, _ = encode_conversations(tokenizer, [list(ex.messages) for ex in read_chat_jsonl(path)])
    tokens = np.array([sum(label != IGNORE_INDEX for label in labels) for _, labels in encoded], dtype=float)
    nll = answer_nll(model, encoded, pad_id=tokenizer.pad_token_id or 0)
    keep = tokens > 0
    return float((nll[keep] * tokens[keep]).sum() / tokens[keep].sum())
