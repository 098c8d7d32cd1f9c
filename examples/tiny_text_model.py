"""Make a tiny random Llama model folder with a locally trained tokenizer (nothing is downloaded).

    python examples/tiny_text_model.py /tmp/tiny-llama

The folder is what ``flexspeed generate --model`` and ``flexspeed serve --model`` read: ``config.json``,
``generation_config.json``, ``model.safetensors``, ``tokenizer.json`` (a byte-level BPE trained here on a few
hundred generated sentences) and ``tokenizer_config.json`` (with a chat template). The weights are random, so
the text is gibberish; everything around it is real.
"""

from __future__ import annotations

import json
import os
import random
import sys

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def sentences(n: int = 400) -> list[str]:
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "so", "vi", "de", "po", "an", "el", "or", "us", "in"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(120)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize() + "." for _ in range(n)]


def main(folder: str) -> None:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences(), trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}, f, indent=1)
    torch.manual_seed(0)
    config = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=tok.get_vocab_size(), max_position_embeddings=256,
                            initializer_range=0.2, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    print(f"wrote {folder}: {sorted(os.listdir(folder))}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama")
