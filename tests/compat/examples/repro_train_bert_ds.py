"""Reproduction of DeepSpeedExamples' ``training/HelloDeepSpeed/train_bert_ds.py`` (not its code).

The same structure and DeepSpeed surface, written for these tests: wikitext lines through
``datasets.load_dataset``, a RoBERTa tokenizer from ``AutoTokenizer.from_pretrained``, masked-LM
examples padded per batch; a ``RobertaModel`` encoder with an LM head tied to the word embeddings
that predicts the masked positions only (its pooler is never used); an experiment directory named
from the clock and numpy's random letters (``hparams.json``, ``tb_dir``) or resumed from one; the
config ``{micro batch, Adam 1e-4, bf16 or fp16, ZeRO stage 1 with optimizer offload to CPU}``;
``initialize``; ``load_checkpoint(load_dir=...)`` returning the ``checkpoint_step`` client state;
the loop ``model(**batch)`` / ``backward`` / ``step`` with ``save_checkpoint(save_dir=...,
client_state={"checkpoint_step": step})`` every ``checkpoint_every`` steps and once at the end;
``fire.Fire(train)``. Like the original it imports ``deepspeed``; the runner rewrites the imports.
"""

import datetime
import json
import os
import pathlib
import random
import string
from functools import partial

import datasets
import fire
import numpy as np
import pytz
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoTokenizer
from transformers.models.roberta import RobertaConfig, RobertaModel

import deepspeed
from deepspeed.accelerator import get_accelerator


def rank0():
    return int(os.environ.get("RANK", "0")) == 0


def mask_example(text, tokenizer, mask_prob, max_length):
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False, truncation=True,
                                                      max_length=max_length - 2) + [tokenizer.eos_token_id]
    ids = np.array(ids)
    inner = np.arange(1, len(ids) - 1)
    chosen = np.random.choice(inner, max(int(mask_prob * len(inner) + np.random.rand()), 1), replace=False)
    labels = np.full(len(ids), tokenizer.pad_token_id)
    labels[chosen] = ids[chosen]
    ids[chosen] = tokenizer.mask_token_id
    return ids.tolist(), labels.tolist()


def pad_batch(batch, pad_token_id):
    width = max(len(ids) for ids, _ in batch)
    src = torch.LongTensor([ids + [pad_token_id] * (width - len(ids)) for ids, _ in batch])
    tgt = torch.LongTensor([lab + [pad_token_id] * (width - len(lab)) for _, lab in batch])
    return {"src_tokens": src, "tgt_tokens": tgt, "attention_mask": src.ne(pad_token_id).type_as(src)}


def endless(loader):
    while True:
        yield from loader


def data_iterator(mask_prob, batch_size, max_seq_length, tokenizer):
    lines = datasets.load_dataset("wikitext", "wikitext-2-v1", split="train")
    lines = lines.filter(lambda r: r["text"] != "").map(lambda r: {"text": r["text"].rstrip("\n")})
    tok = AutoTokenizer.from_pretrained(tokenizer)
    examples = [mask_example(lines[i]["text"], tok, mask_prob, max_seq_length) for i in range(len(lines))]
    return endless(DataLoader(examples, batch_size=batch_size, shuffle=True,
                              collate_fn=partial(pad_batch, pad_token_id=tok.pad_token_id)))


class MaskedLM(nn.Module):
    """RoBERTa encoder + LM head (tied to the word embeddings) scoring the masked positions only."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = RobertaModel(config)  # with its pooler, which the loss never reaches
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, src_tokens, attention_mask, tgt_tokens):
        hidden, *_ = self.encoder(input_ids=src_tokens, attention_mask=attention_mask, return_dict=False)
        where = torch.nonzero((tgt_tokens != self.config.pad_token_id).view(-1)).view(-1)
        picked = torch.index_select(hidden.view(-1, hidden.shape[-1]), 0, where)
        logits = nn.functional.linear(self.norm(nn.functional.gelu(self.dense(picked))),
                                      self.encoder.embeddings.word_embeddings.weight, self.decoder_bias)
        target = torch.index_select(tgt_tokens.view(-1), 0, where)
        return nn.CrossEntropyLoss(ignore_index=-1)(logits, target)


def build_model(num_layers, num_heads, ff_dim, h_dim, dropout):
    config = RobertaConfig.from_dict({
        "attention_probs_dropout_prob": dropout, "hidden_dropout_prob": dropout, "bos_token_id": 0, "eos_token_id": 2,
        "pad_token_id": 1, "hidden_act": "gelu", "hidden_size": h_dim, "intermediate_size": ff_dim,
        "num_attention_heads": num_heads, "num_hidden_layers": num_layers, "initializer_range": 0.02,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 514, "model_type": "roberta", "type_vocab_size": 1,
        "vocab_size": 50265})
    return MaskedLM(config)


def new_experiment(base, hparams):
    now = datetime.datetime.now(pytz.timezone("US/Pacific"))
    letters = string.ascii_lowercase + string.digits
    tag = "".join(letters[i] for i in np.random.choice(len(letters), 8))
    exp_dir = base / f"bert_pretrain.{now:%Y.%m.%d.%H.%M.%S}.{tag}"
    if rank0():
        exp_dir.mkdir()
        (exp_dir / "hparams.json").write_text(json.dumps(hparams, indent=2))
        (exp_dir / "tb_dir").mkdir()
    return exp_dir


def train(checkpoint_dir=None, load_checkpoint_dir=None, mask_prob=0.15, max_seq_length=512, tokenizer="roberta-base",
          num_layers=6, num_heads=8, ff_dim=512, h_dim=256, dropout=0.1, batch_size=8, num_iterations=10000,
          checkpoint_every=1000, log_every=10, local_rank=-1, dtype="bf16"):
    device = torch.device(get_accelerator().device_name(), local_rank) if local_rank > -1 and \
        get_accelerator().is_available() else torch.device("cpu")
    hparams = dict(mask_prob=mask_prob, max_seq_length=max_seq_length, tokenizer=tokenizer, num_layers=num_layers,
                   num_heads=num_heads, ff_dim=ff_dim, h_dim=h_dim, dropout=dropout, batch_size=batch_size,
                   num_iterations=num_iterations, checkpoint_every=checkpoint_every)
    if checkpoint_dir:
        pathlib.Path(checkpoint_dir).mkdir(exist_ok=True)
        exp_dir = new_experiment(pathlib.Path(checkpoint_dir), hparams)
    else:
        exp_dir = pathlib.Path(load_checkpoint_dir)
        saved = json.loads((exp_dir / "hparams.json").read_text())
        num_iterations = max(num_iterations, saved.pop("num_iterations"))
        hparams.update(saved)
    writer = SummaryWriter(log_dir=exp_dir / "tb_dir") if rank0() else None
    batches = data_iterator(hparams["mask_prob"], hparams["batch_size"], hparams["max_seq_length"],
                            hparams["tokenizer"])
    model = build_model(hparams["num_layers"], hparams["num_heads"], hparams["ff_dim"], hparams["h_dim"],
                        hparams["dropout"])
    assert dtype in ("fp16", "bf16")
    ds_config = {"train_micro_batch_size_per_gpu": hparams["batch_size"],
                 "optimizer": {"type": "Adam", "params": {"lr": 1e-4}}, dtype: {"enabled": True},
                 "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
    model, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    start = 1
    if load_checkpoint_dir is not None:
        _, client_state = model.load_checkpoint(load_dir=load_checkpoint_dir)
        start = client_state["checkpoint_step"] + 1
    model.train()
    losses = []
    for step, batch in enumerate(batches, start=start):
        if step >= num_iterations:
            break
        loss = model(**{k: v.to(device) for k, v in batch.items()})
        model.backward(loss)
        model.step()
        losses.append(loss.item())
        if step % log_every == 0 and writer is not None:
            writer.add_scalar("Train/loss", np.mean(losses), step)
        if step % hparams["checkpoint_every"] == 0:
            model.save_checkpoint(save_dir=exp_dir, client_state={"checkpoint_step": step})
    if step % hparams["checkpoint_every"] != 0:
        model.save_checkpoint(save_dir=exp_dir, client_state={"checkpoint_step": step})
    return exp_dir


if __name__ == "__main__":
    torch.manual_seed(42)
    np.random.seed(0)
    random.seed(0)
    fire.Fire(train)
