"""HF ``generate`` arguments through flexspeed against HF's own ``generate``, side by side.

A random-weight model of OPT-125M shape (12 layers, hidden 768, ffn 3072, 12 heads, vocab 50272),
batch 1, prompt 128, 32 new tokens (eos suppressed), 2 threads. For each argument class, HF's
``model.generate(**args)`` on the plain model is timed next to flexspeed's
``engine.generate(**args)`` on ``init_inference(model, dtype=..., replace_with_kernel_inject=True)``
(``fs``: single-token steps on the native kernel; ``fs torch`` : the same injection with the native
kernel off, torch's kernels on oneDNN-packed weights, which holds up better on a busy machine):

- ``greedy``: flexspeed's own loop (the native greedy loop where it is built);
- ``streamer``: flexspeed's loop, streaming each token (no whole-loop native call);
- ``sample top_k/top_p``: flexspeed's loop;
- ``beams 4``, ``no_repeat_ngram 3``, ``min_p 0.05``, ``output_scores``: HF's own loop driving
  flexspeed's runner and static cache (:mod:`flexspeed.inference.hf_generate`).

The repetitions go round-robin over the configurations; medians are reported (tok/s = new tokens
x rows of the returned batch / wall time; ``fs/HF`` > 1 means flexspeed is faster).

    python benchmarks/generate_api.py [--quick] [--dtype bf16|fp32] [--reps 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/generate.py

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

OPT125 = dict(layers=12, hidden=768, ffn=3072, heads=12, vocab=50272)
QUICK = dict(layers=2, hidden=64, ffn=256, heads=4, vocab=512)


class _Sink:
    """A streamer that keeps nothing (HF's ``BaseStreamer`` interface)."""

    def put(self, value: torch.Tensor) -> None:
        pass

    def end(self) -> None:
        pass


CASES: dict[str, dict] = {
    "greedy": {},
    "streamer": {"streamer": "sink"},
    "sample top_k/top_p": {"do_sample": True, "top_k": 40, "top_p": 0.9},
    "beams 4": {"num_beams": 4},
    "no_repeat_ngram 3": {"no_repeat_ngram_size": 3},
    "min_p 0.05": {"do_sample": True, "min_p": 0.05},
    "output_scores": {"return_dict_in_generate": True, "output_scores": True},
}


def _build(shape: dict, dtype: torch.dtype):
    import transformers as tf

    tf.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = tf.OPTConfig(num_hidden_layers=shape["layers"], hidden_size=shape["hidden"], ffn_dim=shape["ffn"],
                       num_attention_heads=shape["heads"], vocab_size=shape["vocab"],
                       word_embed_proj_dim=shape["hidden"], max_position_embeddings=2048)
    return tf.OPTForCausalLM(cfg).eval().to(dtype)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shape, one repetition (smoke test)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--prompt", type=int, default=None)
    p.add_argument("--new", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import flexspeed

    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else OPT125
    reps = args.reps or (1 if args.quick else 3)
    prompt, new = args.prompt or (8 if args.quick else 128), args.new or (4 if args.quick else 32)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hf_model = _build(shape, dtype)
    from flexspeed.inference.kernels import inject_kernels

    engine = flexspeed.init_inference(copy.deepcopy(hf_model), dtype=dtype, replace_with_kernel_inject=True)
    torch_only = flexspeed.init_inference(inject_kernels(copy.deepcopy(hf_model), dtype, native=False), dtype=dtype,
                                          replace_with_kernel_inject=True)
    ids = torch.randint(3, shape["vocab"], (1, prompt), generator=torch.Generator().manual_seed(1))
    base = dict(max_new_tokens=new, min_new_tokens=new, attention_mask=torch.ones_like(ids))

    def call(fn, case: dict):
        kw = {**base, **{k: (_Sink() if v == "sink" else v) for k, v in case.items()}}
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = fn(ids, **kw)
        seqs = out if isinstance(out, torch.Tensor) else out.sequences
        return (seqs.shape[1] - prompt) * seqs.shape[0] / (time.perf_counter() - t0)

    fns = {"hf": hf_model.generate, "fs": engine.generate, "fs torch": torch_only.generate}
    runs = {(name, who): [] for name in CASES for who in fns}
    for name, case in CASES.items():  # warm-up
        for who, fn in fns.items():
            call(fn, case)
    for _ in range(reps):
        for name, case in CASES.items():
            for who, fn in fns.items():
                runs[(name, who)].append(call(fn, case))
    rows = []
    for name in CASES:
        hf, fs, ft = (statistics.median(runs[(name, who)]) for who in ("hf", "fs", "fs torch"))
        rows.append({"case": name, "hf_tok_s": hf, "fs_tok_s": fs, "ratio": fs / hf, "fs_torch_tok_s": ft,
                     "torch_ratio": ft / hf})
    print(f"OPT-125M shape, {args.dtype}, batch 1, prompt {prompt}, {new} new, {args.threads} threads; "
          f"decode: {engine.runner_choice.describe()}")
    print(f"{'case':<20} {'HF tok/s':>9} {'fs tok/s':>9} {'fs/HF':>6} {'fs torch':>9} {'/HF':>5}")
    for r in rows:
        print(f"{r['case']:<20} {r['hf_tok_s']:9.1f} {r['fs_tok_s']:9.1f} {r['ratio']:6.2f} "
              f"{r['fs_torch_tok_s']:9.1f} {r['torch_ratio']:5.2f}")
    return rows


if __name__ == "__main__":
    main()
