"""The demo's evaluation: checkpoint -> consolidated weights -> ``init_inference`` -> greedy answers.

Runs in one process after training, without the processes (or the world size) that saved the
checkpoint: :func:`export_weights` consolidates the sharded checkpoint into one file, and
:func:`evaluate` builds the model on the meta device, lets ``flexspeed.init_inference`` fill it
from that file, and generates each held-out question's answer greedily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from flexspeed.demo.task import AdditionTask

__all__ = ["EvalResult", "export_weights", "evaluate", "default_weights_path"]


@dataclass
class EvalResult:
    """Exact-match accuracy on held-out questions, with a few examples."""

    correct: int
    total: int
    examples: list[tuple[str, int | None, int]] = field(default_factory=list)
    """``(question, model's answer or None if not a number, true answer)``."""

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


def export_weights(ckpt_dir: str, out_file: str) -> str:
    """Consolidate the training checkpoint's model weights (fp32) into ``out_file``; return its path."""
    from flexspeed.runtime.export import consolidate, write_state_dict

    state = consolidate(ckpt_dir, dtype="fp32")
    fmt = "pt" if out_file.endswith((".bin", ".pt", ".pth")) else "safetensors"
    return write_state_dict(state, out_file, fmt)


def evaluate(task: AdditionTask, weights: str, *, dtype: str = "fp32", kernel_inject: bool = False,
             batch_size: int = 250, num_examples: int = 6) -> EvalResult:
    """Answer every held-out question of ``task`` with the model in ``weights``; count exact matches.

    Args:
        task: the task the model was trained on (same digits and seed, so the same held-out set).
        weights: a weight file written by :func:`export_weights`.
        dtype: inference dtype for ``init_inference`` ("fp32", "bf16", ...).
        kernel_inject: ``replace_with_kernel_inject`` (fused layers with a KV cache).
        batch_size: questions per ``generate`` call.
        num_examples: how many (question, answer) pairs to keep for display.
    """
    import flexspeed
    from flexspeed.demo.train import build_model

    model = build_model(task, device="meta")  # no memory until init_inference loads the checkpoint
    engine = flexspeed.init_inference(model, dtype=dtype, checkpoint=weights, replace_with_kernel_inject=kernel_inject)
    qids = task.held_out_ids()
    correct, examples = 0, []
    for start in range(0, len(qids), batch_size):
        chunk = qids[start:start + batch_size]
        prompts = task.prompts(chunk)  # (B, prompt_len)
        with torch.no_grad():
            out = engine.generate(prompts, max_new_tokens=task.answer_len, do_sample=False)  # (B, prompt + answer)
        answers = out[:, task.prompt_len:task.prompt_len + task.answer_len].tolist()
        for qid, tokens in zip(chunk.tolist(), answers, strict=True):
            a, b = task.operands(qid)
            got = task.decode_answer(tokens) if len(tokens) == task.answer_len else None
            correct += int(got == a + b)
            if len(examples) < num_examples:
                examples.append((task.text(a, b), got, a + b))
    return EvalResult(correct=correct, total=len(qids), examples=examples)


def default_weights_path(out_dir: str) -> str:
    """Where ``flexspeed demo`` writes the consolidated weights."""
    return os.path.join(out_dir, "model", "pytorch_model.bin")
