"""Tiny random-weight causal LMs built from configs, saved as real Hugging Face folders.

Each architecture exercises a different cache shape: GPT-2 (multi-head, learned positions),
Llama (grouped-query, rotary), Falcon-style multi-query via Llama with one KV head, and Gemma 2
(alternating sliding-window and global layers, so layers keep different lengths)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "KV caches let a model skip re-reading a long context. Compression makes them cheap to store.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ] { } ' \" - _ / \\ @ # $ % ^ & *",
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _config(arch: str):
    from transformers import Gemma2Config, GPT2Config, LlamaConfig

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=1024, **common)
    if arch == "llama":  # grouped-query: 4 query heads share 2 KV heads
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,  # encode refuses documents past it; tests encode a few thousand tokens
            **common,
        )
    if arch == "llama-mqa":  # multi-query: one KV head
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            **common,
        )
    if arch == "gemma2":  # sliding window of 16 on every other layer
        return Gemma2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=16,
            max_position_embeddings=1024,
            pad_token_id=0,
            **common,
        )
    if arch in ("gemma3", "gemma3-one-base"):  # per-layer-type rope nested in rope_parameters
        from transformers import Gemma3TextConfig

        full = 10000.0 if arch == "gemma3-one-base" else 1000000.0
        return Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": full}},
            max_position_embeddings=1024,
            pad_token_id=0,
            **common,
        )
    if arch == "qwen2-sw":  # sliding window of 16 on layers 1 and 2 (max_window_layers=1)
        from transformers import Qwen2Config

        return Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=16,
            max_window_layers=1,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
            max_position_embeddings=1024,
            **common,
        )
    raise ValueError(arch)


# Built by the session fixture for every test; the architectures below it are built by the tests that use them.
ARCHES = ("gpt2", "llama", "llama-mqa", "gemma2")
MORE_ARCHES = ("gemma3", "gemma3-one-base", "qwen2-sw")


def build_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch))
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder
