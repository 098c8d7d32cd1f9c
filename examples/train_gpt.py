"""A DeepSpeed-style training script: the only flexspeed-specific line is the import.

    python examples/train_gpt.py --deepspeed --deepspeed_config examples/ds_config_zero0.json
    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --deepspeed --deepspeed_config examples/ds_config_zero0.json

It trains the small GPT of flexspeed.models on a synthetic next-token task (arithmetic
sequences modulo the vocabulary) and prints the loss; it falls far below ln(vocab) = 4.16 when
learning works.
"""

import argparse

import torch
from torch.utils.data import Dataset

import flexspeed as deepspeed
from flexspeed.models import GPT, GPTConfig


class StrideTask(Dataset):
    """x[t+1] = (x[t] + s) mod vocab, random start and stride s in {1, 2}: predictable from two tokens."""

    def __init__(self, n: int = 2048, seq: int = 32, vocab: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 3, (n, 1), generator=g)
        self.data = (start + stride * torch.arange(seq + 1)) % vocab

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i, :-1], self.data[i, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description="train a small GPT with flexspeed")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by some launchers")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64))
    engine, optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters(), training_data=StrideTask())

    step, losses = 0, []
    while step < args.steps:
        for x, y in loader:
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            step = engine.global_steps
            if step >= args.steps:
                break
    if engine.global_rank == 0:
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        print(f"world_size={engine.world_size} steps={engine.global_steps} loss {first:.3f} -> {last:.3f} "
              f"lr={engine.get_lr()[0]:.2e}", flush=True)


if __name__ == "__main__":
    main()
