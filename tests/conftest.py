"""Shared fixtures: a tiny random Llama (2 layers, hidden 64) with the embedded model's real tokenizer.

The tokenizer comes from the embedded SmolLM2 GGUF (converted once into the cache), so prompts, chat
templates and byte counts behave as on the real model while every forward pass takes milliseconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep tests from fighting over the 2 cores when several processes run them.
torch.set_num_threads(int(os.environ.get("LORASCOPE_TEST_THREADS", "2")))


def make_tiny_llama(vocab_size: int, seed: int = 0, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer():
    from lorascope.models import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A local HF model dir (config, safetensors, tokenizer) usable as a model spec anywhere."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(len(tokenizer))
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture()
def tiny_model(tiny_model_dir):
    """A fresh in-memory copy of the tiny model (tests may mutate it)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    m.eval()
    return m
