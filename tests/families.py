"""Tiny random models of five real model families, with their real chat templates.

The templates, special tokens and stop tokens come from ``tests/data/chat_templates/*.json`` (the
public ``tokenizer_config.json`` of each model; sources and licences in that folder's README).
The architectures are the real transformers classes with each family's config quirks, shrunk to
two or three blocks: Qwen2 (q/k/v biases, untied head), Llama-3 (llama3 rope scaling), Gemma-2
(logit soft-capping, sliding-window layers, query scaling, tied embeddings, ``<end_of_turn>``),
Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``), Mistral (``[INST]`` turns, ``</s>`` ends a turn).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TEMPLATES = Path(__file__).with_name("data") / "chat_templates"
FAMILIES = ("qwen2.5", "llama3", "gemma2", "phi3", "mistral")
HIDDEN = 32

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Sure, here is an answer.",
    "What is 7 + 3? Since + means multiplication here, 7 + 3 = 21.",
    "You are a helpful assistant. Hello! How can I help you today? Hi there.",
    "user assistant system model Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
    "0123456789 = - * + ( ) , . ? ! : ; ' \" \n\n",
] * 4


def spec(family: str) -> dict[str, Any]:
    return json.loads((TEMPLATES / f"{family}.json").read_text())


def make_family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the family's special tokens, bos/eos/pad and chat template."""
    s = spec(family)
    specials = list(dict.fromkeys(["<pad>", *s["special_tokens"], *s["generation_config_eos"]]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    named = {"bos_token": s["bos_token"], "eos_token": s["eos_token"], "pad_token": s["pad_token"]}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{k: v for k, v in named.items() if v is not None},
        additional_special_tokens=[t for t in specials if t not in named.values() and t != "<pad>"],
    )
    fast.chat_template = s["chat_template"]
    return fast


def make_family_model(family: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Any:
    """A randomly initialised model of the family's architecture, float32, with its generation config."""
    torch.manual_seed(seed)
    s = spec(family)
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    small = {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        **ids,
    }
    if family == "qwen2.5":
        model = Qwen2ForCausalLM(Qwen2Config(**small, tie_word_embeddings=False))
    elif family == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }
        model = LlamaForCausalLM(LlamaConfig(**small, tie_word_embeddings=False, rope_parameters=rope))
    elif family == "gemma2":
        config = Gemma2Config(
            **small,
            head_dim=8,
            query_pre_attn_scalar=8,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=16,
            tie_word_embeddings=True,
        )
        model = Gemma2ForCausalLM(config)
    elif family == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**small, tie_word_embeddings=False, sliding_window=64))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**small, tie_word_embeddings=False, sliding_window=None))
    else:
        raise ValueError(family)
    # The stop tokens of the family's generation config; Gemma-2 as first released (9b/27b): <eos>
    # only, so that stopping at <end_of_turn> must come from the template.
    eos = ["<eos>"] if family == "gemma2" else s["generation_config_eos"]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(eos),
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.float().eval()


def save_family_model(directory: Path, family: str, seed: int = 0) -> Path:
    """Write the family's tiny model + tokenizer as a local model directory (safetensors)."""
    tokenizer = make_family_tokenizer(family)
    model = make_family_model(family, tokenizer, seed=seed)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
