"""Mean negative log-likelihood of each conversation's assistant tokens, batched by length.

``L_m(d)`` = mean over the assistant tokens of ``d`` (chat template applied, end-of-turn included)
of ``−log p_m(token | everything before it)``: the quantity Interleaving++ selection and the
dataset screen compare across models.

Conversations are sorted by length and packed into batches of at most ``batch_tokens`` padded
tokens, so short examples do not pay for long ones; the output head runs only where an assistant
token is predicted (``emguard.logits``). Results come back in input order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from emguard.data.tokenize import IGNORE_INDEX, tokenize_conversation
from emguard.likelihood.cache import NLLCache, example_key
from emguard.logits import logits_at, output_head

Encoded = tuple[list[int], list[int]]  # (input_ids, labels) from tokenize_conversation


def length_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int = 64) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size stays within ``batch_tokens``.

    A single sequence longer than ``batch_tokens`` gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending length: the newest member is the longest
        if current and ((len(current) + 1) * lengths[i] > batch_tokens or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(chunk: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in chunk)
    ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
    labels = torch.full((len(chunk), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(chunk), length), dtype=torch.long)
    for row, (i, lab) in enumerate(chunk):
        ids[row, : len(i)], labels[row, : len(lab)], mask[row, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, labels, mask


@torch.no_grad()
def answer_nll(
    model: Any,
    encoded: Sequence[Encoded],
    *,
    pad_id: int = 0,
    batch_tokens: int = 4096,
    on_batch: Callable[[list[int], np.ndarray], None] | None = None,
) -> np.ndarray:
    """``L(d)`` per conversation: mean NLL (nats) over its assistant tokens; NaN if it has none.

    Args:
        model: A causal LM (optionally PEFT-wrapped) in whatever adapter state should be scored.
        encoded: ``(input_ids, labels)`` per conversation (``emguard.data.tokenize.tokenize_conversation``).
        pad_id: Padding token id (masked out, so its value does not matter for the result).
        batch_tokens: Upper bound on padded tokens per forward pass.
        on_batch: Called with ``(indices, values)`` after each batch (progress, caching).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    head = output_head(model)
    out = np.full(len(encoded), np.nan)
    try:
        for indices in length_batches([len(ids) for ids, _ in encoded], batch_tokens):
            ids, labels, mask = pad_batch([encoded[i] for i in indices], pad_id)
            targets = labels[:, 1:].to(device)
            positions = torch.zeros_like(ids, dtype=torch.bool, device=device)
            positions[:, :-1] = targets != IGNORE_INDEX  # position t predicts token t + 1
            with logits_at(head, positions):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logits = logits.float()
            picked = targets[targets != IGNORE_INDEX]
            nll = torch.logsumexp(logits, -1) - logits.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
            row = positions.nonzero()[:, 0]
            sums = torch.zeros(len(indices), device=device).index_add_(0, row, nll)
            counts = positions.sum(1)
            values = torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan).cpu().numpy()
            out[indices] = values
            if on_batch:
                on_batch(indices, values)
    finally:
        model.train(was_training)
    return out


def encode_conversations(tokenizer: Any, conversations: Sequence[Sequence[dict]]) -> tuple[list[Encoded], list[str]]:
    """``(input_ids, labels)`` per conversation and its cache key (a hash of the tokens and the mask)."""
    encoded = [tokenize_conversation(tokenizer, c) for c in conversations]
    return encoded, [example_key(ids, labels) for ids, labels in encoded]


def cached_answer_nll(
    model: Any,
    encoded: Sequence[Encoded],
    keys: Sequence[str],
    cache: NLLCache | None,
    *,
    pad_id: int = 0,
    batch_tokens: int = 4096,
    on_batch: Callable[[list[int], np.ndarray], None] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """``answer_nll`` of the conversations ``cache`` does not hold yet; the others read from it.

    ``cache`` holds losses of this exact model state (``emguard.likelihood.cache``); new losses are
    written after every batch, so an interrupted run keeps what it finished. ``on_batch(indices,
    values)`` reports the computed ones (indices into ``encoded``). Returns the losses and the
    indices that were computed (not read from the cache).
    """
    known = cache.get(keys) if cache is not None else {}
    out = np.array([known.get(k, np.nan) for k in keys], dtype=float)
    pending = [i for i, k in enumerate(keys) if k not in known]
    if not pending:
        return out, []

    def store(batch: list[int], values: np.ndarray) -> None:
        rows = [pending[j] for j in batch]
        out[rows] = values
        if cache is not None:
            cache.put({keys[r]: float(v) for r, v in zip(rows, values, strict=True)})
        if on_batch:
            on_batch(rows, values)

    answer_nll(model, [encoded[i] for i in pending], pad_id=pad_id, batch_tokens=batch_tokens, on_batch=store)
    return out, pending
