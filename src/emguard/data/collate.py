"""Batching tokenized chat examples."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emguard.data.tokenize import IGNORE_INDEX, TokenizedExample


class ChatCollator:
    """Pads tokenized examples into a batch (right padding).

    The batch holds ``input_ids``, ``attention_mask``, ``labels`` and ``tag_ids`` (index into
    ``tags``), so the trainer can report the loss of mixed-in data apart from the customer's.
    """

    def __init__(self, pad_token_id: int, tags: Sequence[str] = ("train",), pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.tags = tuple(tags)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        length = max(len(f.input_ids) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f.input_ids)
            input_ids[row, :n] = torch.tensor(f.input_ids)
            labels[row, :n] = torch.tensor(f.labels)
            attention_mask[row, :n] = 1
        tag_ids = torch.tensor([self.tags.index(f.tag) for f in features], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "tag_ids": tag_ids}
