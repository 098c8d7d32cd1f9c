"""Tiny random model folders with a locally trained tokenizer, and HF's greedy text for a prompt.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with ``tokenizers`` on a few
hundred generated sentences and saved as ``tokenizer.json`` + ``tokenizer_config.json`` (with a
chat template); the model is a random ``transformers`` model (init std 0.2, so logits are far from
flat and greedy ties are unlikely) saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import random

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
SPECIAL = ["<s>", "</s>", "<pad>"]


def sentences(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "so", "vi", "de", "po", "an", "el", "or", "us", "in", "é", "ü"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(120)]
    out = []
    for _ in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        out.append(body[0].upper() + body[1:] + rng.choice([".", "!", "?", ",", " ok."]))
    return out


def train_tokenizer(folder: str, vocab: int = 384, chat: bool = True) -> None:
    """A byte-level BPE saved as tokenizer.json + tokenizer_config.json in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(), trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20}
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def save_model(folder: str, family: str = "llama", vocab: int = 384, positions: int = 256) -> None:
    """A tiny random ``family`` model (llama, opt, gpt2, gpt_neox, bloom) in ``folder``; ids 0/1/2 = bos/eos/pad."""
    import transformers as tf

    tf.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if family == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=positions,
                             initializer_range=0.2, **ids)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "opt":
        cfg = tf.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, vocab_size=vocab,
                           max_position_embeddings=positions, word_embed_proj_dim=64, init_std=0.2, **ids)
        model = tf.OPTForCausalLM(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=positions,
                            initializer_range=0.2, **ids)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               vocab_size=vocab, max_position_embeddings=positions, initializer_range=0.2, **ids)
        model = tf.GPTNeoXForCausalLM(cfg)
    else:  # bloom: a family outside flexspeed's registry (ALiBi)
        cfg = tf.BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=vocab, initializer_range=0.2, **ids)
        model = tf.BloomForCausalLM(cfg)
    model.eval().save_pretrained(folder)


def make_folder(folder: str, family: str = "llama", chat: bool = True, positions: int = 256) -> str:
    train_tokenizer(folder, chat=chat)
    save_model(folder, family, positions=positions)
    return folder


class Reference:
    """HF ``generate`` + decode (greedy) for a model folder: the text every test compares with."""

    def __init__(self, folder: str) -> None:
        import transformers as tf

        self.tok = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()

    def ids(self, prompt: str) -> list[int]:
        return list(self.tok(prompt).input_ids)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def greedy(self, ids: list[int], max_new_tokens: int) -> tuple[str, list[int]]:
        """(text, new token ids) of HF's greedy generation (stops at eos, as HF does)."""
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, len(ids):].tolist()
        return self.tok.decode(new, skip_special_tokens=True), new

    def text(self, prompt: str, max_new_tokens: int) -> str:
        return self.greedy(self.ids(prompt), max_new_tokens)[0]
