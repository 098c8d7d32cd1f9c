"""Per-rank model-state bytes of ZeRO stages 0-3 against the ZeRO paper's formula.

For fp32 parameters and Adam (4 bytes each of parameter, gradient and two moments; Ψ parameters,
N ranks) the paper (arXiv:1910.02054) gives: stage 0 16Ψ, stage 1 8Ψ + 8Ψ/N, stage 2 4Ψ + 12Ψ/N,
stage 3 16Ψ/N. Workload: shared/ANCHORS.md's GPT (4 layers, d_model 256, 4 heads, vocab 1024,
seq 128; Ψ = 3.7M), AdamW, gradient accumulation 1, world sizes 1, 2 and 4 (gloo, spawned).

What is measured, per rank (``engine.memory_breakdown()``, which counts local shards): the bytes
of parameters, gradients and optimizer state, plus the full parameter copies FSDP2 holds gathered
for compute, sampled after forward, after backward and after the step of the second step. Two
numbers per stage:

- ``peak``: the largest sum of all four over the samples; this is compared with the formula.
  Stages 0-2 keep full parameters for the whole forward/backward, which the paper counts as model
  state; at stage 3 the gathered copies (FSDP2 keeps the root's parameters, here the embeddings
  and head, from forward to backward) never coincide with gradients, so the peak stays at 16Ψ/N.
- ``sharded``: parameters + gradients + optimizer state after backward (no gathered copies).

Stage 3 runs with ``stage3_param_persistence_threshold: 0`` (everything sharded, as the formula
assumes); the extra row "3*" shows DeepSpeed's default threshold (1e5 elements stay whole).
The reported value is the largest over ranks (stage 1 partitions whole tensors, so ranks differ).

    python benchmarks/zero_memory.py [--worlds 1 2 4]
"""

from __future__ import annotations

import argparse

FORMULA = {0: lambda n: 16.0, 1: lambda n: 8 + 8 / n, 2: lambda n: 4 + 12 / n, 3: lambda n: 16 / n}
CASES = [(0, 0), (1, 0), (2, 0), (3, 0), (3, 100_000)]  # (stage, persistence threshold)


def _total(mb: dict) -> int:
    return mb["parameters"] + mb["gradients"] + mb["optimizer_states"] + mb["gathered_parameters"]


def _measure(stage: int, threshold: int, world: int) -> dict:
    import torch

    import flexspeed
    from flexspeed.models import GPT

    torch.manual_seed(0)
    model = GPT()
    psi = model.num_parameters()
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": threshold},
           "steps_per_print": 1000}
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    g = torch.Generator().manual_seed(1)
    samples = []
    sharded = 0
    for _ in range(2):
        x = torch.randint(0, 1024, (1, 129), generator=g)
        loss = engine(x[:, :-1], x[:, 1:])
        samples.append(engine.memory_breakdown())
        engine.backward(loss)
        after_backward = engine.memory_breakdown()
        samples.append(after_backward)
        engine.step()
        samples.append(engine.memory_breakdown())
        sharded = after_backward["parameters"] + after_backward["gradients"] + after_backward["optimizer_states"]
    return {"psi": psi, "peak": max(_total(s) for s in samples), "sharded": sharded,
            "gathered": max(s["gathered_parameters"] for s in samples)}


def _rank_main(rank: int, world: int) -> list[dict]:
    return [_measure(stage, threshold, world) for stage, threshold in CASES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    from flexspeed.testing import run_ranks

    rows = []
    for world in args.worlds:
        per_rank = run_ranks(_rank_main, world_size=world, timeout=600, env={"OMP_NUM_THREADS": "1"})
        for i, (stage, threshold) in enumerate(CASES):
            psi = per_rank[0][i]["psi"]
            peak = max(r[i]["peak"] for r in per_rank)
            sharded = max(r[i]["sharded"] for r in per_rank)
            gathered = max(r[i]["gathered"] for r in per_rank)
            formula = FORMULA[stage](world) * psi
            label = f"{stage}*" if threshold else str(stage)
            rows.append((world, label, psi, peak, sharded, gathered, formula, peak / formula))
    mib = 2**20
    print(f"\nPer-rank model-state bytes, fp32 + AdamW (MiB); Ψ = {rows[0][2]:,} parameters")
    print("| N | stage | peak (params+grads+opt+gathered) | sharded (params+grads+opt) | gathered | paper formula "
          "| peak/formula |")
    print("|---|---|---|---|---|---|---|")
    for world, label, psi, peak, sharded, gathered, formula, ratio in rows:
        flag = "" if label.endswith("*") or abs(ratio - 1) <= 0.10 else "  <-- off by more than 10%"
        print(f"| {world} | {label} | {peak / mib:.2f} | {sharded / mib:.2f} | {gathered / mib:.2f} | "
              f"{formula / mib:.2f} | {ratio:.3f}{flag} |")
    print("3* = stage 3 with DeepSpeed's default stage3_param_persistence_threshold (1e5): small "
          "parameters stay whole, so it sits above 16Ψ/N by design.")


if __name__ == "__main__":
    main()
