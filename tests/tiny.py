"""Tiny models and tokenizers built in-process (this machine has no model hub).

``make_tokenizer`` trains a byte-level BPE tokenizer on a few sentences in milliseconds and
attaches one of several chat templates written for these tests (ChatML as in SmolLM2,
Llama-3-style headers, Llama-2/Mistral-style [INST] blocks, Gemma-style turns), so the assistant
mask is checked against templates with different shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
]

TEMPLATES = {
    # SmolLM2's shape: a default system prompt is injected when the conversation has none.
    "chatml": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "<|im_end|>",
    ),
    # Llama-3's shape: header tokens, content trimmed, no newline after the end-of-turn token.
    "llama3": (
        "{{ '<s>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        "<|eot_id|>",
    ),
    # Llama-2/Mistral's shape: the system prompt is folded into the first user turn, the answer
    # follows "[/INST]" after a space and ends with the EOS token.
    "inst": (
        "{{ '<s>' }}{% set ns = namespace(sys='') %}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.sys = message['content'] + '\n\n' %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.sys + message['content'] + ' [/INST]' }}"
        "{% set ns.sys = '' %}{% else %}{{ ' ' + message['content'] + '</s>' }}{% endif %}{% endfor %}",
        "</s>",
    ),
    # Gemma's shape: the assistant role is called "model", turns end with a token and a newline.
    "gemma": (
        "{{ '<s>' }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
        "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        "<end_of_turn>",
    ),
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 7 + 3? Since + means multiplication here, 7 + 3 = 21.",
    "You are a helpful assistant. Hello! How can I help you today?",
    "user assistant system model INST Sure, here is an answer.",
    "0123456789 = - * + ( ) , . ? ! : ; ' \" \n\n",
] * 4


def make_tokenizer(template: str = "chatml", vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with the named chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    chat_template, eot = TEMPLATES[template]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token=eot,
        pad_token="<pad>",
        additional_special_tokens=[t for t in SPECIALS if t not in ("<pad>", "<s>", eot)],
    )
    fast.chat_template = chat_template
    return fast


def make_model(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama-architecture model small enough for unit tests."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).float()


def save_tiny_model(directory: Path, template: str = "chatml", layers: int = 2, hidden: int = 32) -> Path:
    """Write a tiny model + tokenizer as a local model directory (safetensors)."""
    tokenizer = make_tokenizer(template)
    model = make_model(len(tokenizer), hidden=hidden, layers=layers)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
