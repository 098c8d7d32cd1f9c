"""Shared pieces of the parity tests: a tiny GPT, a deterministic token dataset, the same
data order as flexspeed's dataloader, and a single-process plain-PyTorch reference loop."""

from __future__ import annotations

import copy

import torch
from torch.utils.data import DistributedSampler, TensorDataset

from flexspeed.models import GPT, GPTConfig

# bias=False: the attention key bias has an exactly-zero true gradient (softmax is invariant to it), so
# Adam would amplify reduction-order noise in it into lr-sized updates and break any 1e-5 comparison.
TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False)


def make_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw}))


def make_dataset(n: int = 64, seq: int = 16, vocab: int = 64, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return TensorDataset(x[:, :-1].contiguous(), x[:, 1:].contiguous())


def global_batches(dataset, *, world: int, micro: int, gas: int, steps: int, seed: int = 0):
    """The samples each optimizer step sees, in the order flexspeed's loader serves them."""
    per_rank = []
    for r in range(world):
        s = DistributedSampler(dataset, num_replicas=world, rank=r, shuffle=True, seed=seed)
        s.set_epoch(0)
        per_rank.append(list(s))
    out = []
    for k in range(steps):
        idx = []
        for r in range(world):
            idx += per_rank[r][k * gas * micro:(k + 1) * gas * micro]
        xs = torch.stack([dataset[i][0] for i in idx])
        ys = torch.stack([dataset[i][1] for i in idx])
        out.append((xs, ys))
    return out


def reference_run(model, batches, *, lr=1e-2, clip=0.0, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                  autocast_dtype=None, lr_at=None):
    """Plain PyTorch: AdamW on the full global batch per step, optional clipping; ``lr_at(k)``, if
    given, is the lr of optimizer step k (1-based), e.g. ``tests.compat.ds_reference``'s DeepSpeed schedule."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    losses = []
    for step, (xs, ys) in enumerate(batches, start=1):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
        if autocast_dtype is None:
            loss = model(xs, ys)
        else:
            with torch.autocast("cpu", dtype=autocast_dtype):
                loss = model(xs, ys)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
