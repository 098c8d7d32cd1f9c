"""The demo's task: multi-digit addition as character tokens, generated from a seed.

A question ``"12+34="`` is followed by the answer's digits *reversed* (``"640"`` for 46): a
left-to-right model then produces the ones digit first and can carry, the order in which people
add, which makes the task learnable by a small model in a few hundred steps. Operands are
zero-padded to ``digits`` characters and answers to ``digits + 1``, so every example has the same
length and no padding token is needed. A fixed share of all ``10**digits`` squared questions,
chosen by the seed, is held out from training and used to measure exact-match accuracy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.data import Dataset

__all__ = ["VOCAB", "AdditionTask", "AdditionData", "DEMO_CONFIG", "MODEL_SHAPE"]

VOCAB = "0123456789+="
PLUS, EQUALS = VOCAB.index("+"), VOCAB.index("=")

# The model: 2 layers, 64 wide - about 0.1M parameters, enough for 2-digit addition.
MODEL_SHAPE = {"n_layer": 2, "n_head": 4, "n_embd": 64}

# Identical to examples/ds_config_demo.json (a test keeps them equal); `flexspeed demo` uses this
# when no --config is given, so the command also works from an installed wheel.
DEMO_CONFIG: dict = {
    "train_micro_batch_size_per_gpu": 64,
    "gradient_accumulation_steps": 1,
    "steps_per_print": 100,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.0}},
    "scheduler": {"type": "WarmupCosineLR",
                  "params": {"total_num_steps": 600, "warmup_num_steps": 30, "warmup_type": "linear"}},
    "gradient_clipping": 1.0,
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 2},
    "csv_monitor": {"enabled": True, "output_path": "demo_out/monitor", "job_name": "addition"},
}


@dataclass(frozen=True)
class AdditionTask:
    """``digits``-digit addition; ``held_out`` questions (chosen by ``seed``; at most a fifth of all)
    never appear in training."""

    digits: int = 2
    seed: int = 1234
    held_out: int = 500

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 6:
            raise ValueError(f"digits={self.digits}: the demo supports 1 to 6 digits")
        if self.held_out < 1:
            raise ValueError(f"held_out={self.held_out}: hold out at least 1 question to measure accuracy")

    @property
    def num_questions(self) -> int:
        return (10 ** self.digits) ** 2

    @property
    def num_held_out(self) -> int:
        return min(self.held_out, self.num_questions // 5)

    @property
    def prompt_len(self) -> int:
        """Tokens of ``"a+b="``."""
        return 2 * self.digits + 2

    @property
    def answer_len(self) -> int:
        return self.digits + 1

    @property
    def seq_len(self) -> int:
        """Tokens the model sees: the prompt and the answer, minus the last one (it is only a target)."""
        return self.prompt_len + self.answer_len - 1

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- encoding -------------------------------------------------------------------------------
    def operands(self, qid: int) -> tuple[int, int]:
        n = 10 ** self.digits
        return qid // n, qid % n

    def prompt(self, a: int, b: int) -> list[int]:
        d = self.digits
        return [int(c) for c in f"{a:0{d}d}"] + [PLUS] + [int(c) for c in f"{b:0{d}d}"] + [EQUALS]

    def answer(self, a: int, b: int) -> list[int]:
        """The answer tokens as the model writes them: ones digit first."""
        return [int(c) for c in f"{a + b:0{self.answer_len}d}"][::-1]

    def decode_answer(self, tokens: list[int]) -> int | None:
        """Answer tokens (reversed digits) back to a number; ``None`` if any token is not a digit."""
        if any(t > 9 for t in tokens):
            return None
        return int("".join(str(t) for t in reversed(tokens)))

    def text(self, a: int, b: int) -> str:
        return f"{a}+{b}"

    # ---- splits ---------------------------------------------------------------------------------
    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(self.num_questions, generator=g)

    def held_out_ids(self) -> torch.Tensor:
        return self._permutation()[: self.num_held_out]

    def train_data(self) -> AdditionData:
        return AdditionData(self, self._permutation()[self.num_held_out:])

    def prompts(self, qids: torch.Tensor) -> torch.Tensor:
        """``(N, prompt_len)`` prompt tokens of the given question ids."""
        return torch.tensor([self.prompt(*self.operands(int(q))) for q in qids], dtype=torch.long)


class AdditionData(Dataset):
    """Training examples ``(x, y)``: ``x`` the sequence, ``y`` the next tokens with the prompt masked (-100)."""

    def __init__(self, task: AdditionTask, qids: torch.Tensor) -> None:
        self.task = task
        self.qids = qids

    def __len__(self) -> int:
        return len(self.qids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.task.operands(int(self.qids[i]))
        seq = torch.tensor(self.task.prompt(a, b) + self.task.answer(a, b), dtype=torch.long)
        x, y = seq[:-1], seq[1:].clone()  # (T,), (T,)
        y[: self.task.prompt_len - 1] = -100  # learn only the answer; the operands are random
        return x, y
