"""Chat data: loading and validation, built-in datasets, tokenisation with assistant-only labels.

Nothing here imports torch (``emguard data check`` starts fast); batching is in ``collate``.
"""

from emguard.data.builtin import BUILTIN_DATASETS
from emguard.data.chat import ChatExample, check_chat_jsonl, read_chat_jsonl
from emguard.data.sources import load_examples
from emguard.data.tokenize import TokenizedExample, tokenize_conversation, tokenize_examples

__all__ = [
    "BUILTIN_DATASETS",
    "ChatExample",
    "TokenizedExample",
    "check_chat_jsonl",
    "load_examples",
    "read_chat_jsonl",
    "tokenize_conversation",
    "tokenize_examples",
]
