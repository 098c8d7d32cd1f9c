"""Tiny random models of the nine families flexspeed's family registry covers (no downloads)."""

from __future__ import annotations

import torch
import torch.nn as nn

from flexspeed.models.gpt import GPT

V = 97
NINE = ("gpt", "gpt2", "opt", "llama", "mistral", "qwen2", "phi3", "gemma", "gpt_neox")


def build(name: str, **overrides) -> nn.Module:
    """A 2-layer random model of family ``name`` (init std 0.2: logits far from flat), fp32, eval mode;
    ``overrides``: config keys of an HF family (GPT-NeoX's ``rotary_pct``, ``use_parallel_residual``)."""
    import transformers as tf

    torch.manual_seed(0)
    common = {**dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     vocab_size=V, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
              **overrides}
    if name == "gpt":
        return GPT(n_layer=2, n_embd=64, n_head=4, vocab_size=V, block_size=64).eval()
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=64,
                                                bos_token_id=1, eos_token_id=2, initializer_range=0.2)).eval()
    if name == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                              vocab_size=V, max_position_embeddings=64, init_std=0.2,
                                              bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common)).eval()
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, **common)).eval()
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **common)).eval()
    if name == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=2, **common)).eval()
    if name == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=2, head_dim=16, **common)).eval()
    if name == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**{"rotary_pct": 0.5, "max_position_embeddings": 64, **common})
        return tf.GPTNeoXForCausalLM(cfg).eval()
    raise KeyError(name)


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, V, (3, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask
