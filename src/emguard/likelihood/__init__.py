"""Answer likelihoods and their on-disk cache: the one home of the scoring that the probe, the EM
monitor, Interleaving++ selection and the dataset screen share.

``L_m(d)`` is the mean negative log-likelihood of conversation ``d``'s assistant tokens under
model state ``m`` (``nll``); losses are cached per (model state, tokenised conversation) under
``$EMGUARD_CACHE/nll`` (``cache``).
"""

from emguard.likelihood.cache import NLLCache, adapter_fingerprint, example_key, state_key
from emguard.likelihood.nll import (
    Encoded,
    answer_nll,
    cached_answer_nll,
    encode_conversations,
    length_batches,
    pad_batch,
)

__all__ = [
    "Encoded",
    "NLLCache",
    "adapter_fingerprint",
    "answer_nll",
    "cached_answer_nll",
    "encode_conversations",
    "example_key",
    "length_batches",
    "pad_batch",
    "state_key",
]
