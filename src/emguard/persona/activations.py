"""Mean residual-stream activation over each conversation's response tokens, at every layer.

For conversation ``i`` and layer ``ℓ`` (row 0 = token embeddings, row ``ℓ + 1`` = output of decoder
block ``ℓ``, the rows ``steering`` reads; taken from the blocks themselves, since Hugging Face's
last ``hidden_states`` entry is normed):

    a_i[ℓ] = mean over the response tokens t of hidden_states[ℓ][i, t]

Response tokens are the assistant tokens the trainer puts a loss on (content and end-of-turn, see
``emguard.data.tokenize``); the prompt and system prompt are context only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from emguard.blocks import capture_block_outputs, decoder_blocks
from emguard.data.tokenize import IGNORE_INDEX, tokenize_conversation
from emguard.likelihood import length_batches, pad_batch


@torch.no_grad()
def response_activations(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict]],
    *,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``[N, num_blocks + 1, hidden]`` float32 on the CPU; rows of conversations with no response are NaN."""
    encoded = [tokenize_conversation(tokenizer, c) for c in conversations]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    blocks = decoder_blocks(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: torch.Tensor | None = None
    try:
        for indices in length_batches([len(ids) for ids, _ in encoded], batch_tokens):
            ids, labels, mask = pad_batch([encoded[i] for i in indices], pad)
            with capture_block_outputs(blocks, range(len(blocks))) as outputs:
                embeddings = model(
                    input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, use_cache=False
                ).hidden_states[0]
            # Block outputs from hooks: transformers' last hidden_states entry has the final norm applied.
            stacked = torch.stack([embeddings, *(outputs[b] for b in range(len(blocks)))], 1).float()
            response = (labels != IGNORE_INDEX).to(device=device, dtype=stacked.dtype)
            sums = torch.einsum("blsh,bs->blh", stacked, response)
            means = sums / response.sum(1).view(-1, 1, 1)  # 0/0 = NaN when there is no response
            if out is None:
                out = torch.empty(len(encoded), *means.shape[1:])
            out[indices] = means.cpu()
            if on_batch:
                on_batch(len(indices))
    finally:
        model.train(was_training)
    return out if out is not None else torch.empty(0)
