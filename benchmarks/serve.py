"""Serving throughput: ``flexspeed serve`` under N concurrent clients against HF ``generate`` one request at a time.

    python benchmarks/serve.py                       # OPT-125M shape, random fp32 weights, prompt 64, answer 64
    python benchmarks/serve.py --clients 1,4,16,64 --dtype bf16 --hf-requests 8
    python benchmarks/serve.py --quick               # a tiny model, two client counts: does the script run

The model folder (unless ``--model``) is a random OPT with OPT-125M's shape (12 layers, hidden 768, 12 heads,
ffn 3072, vocab 50272) next to a byte-level BPE of the same vocabulary trained here on generated text; nothing is
downloaded. Every request is the same shape: a prompt of exactly ``--prompt-len`` tokens (sent as token ids, so
the length is exact) and exactly ``--gen-len`` new tokens (``ignore_eos``; the folder's model config names no eos,
so HF's ``generate`` runs the same length). Prompts differ.

1. **HF** (this process, before the server starts): ``--hf-requests`` requests one by one through
   ``model.generate`` (greedy) + decode; a streamer stamps every token.
2. **flexspeed serve** (its own process, ``--max-num-seqs`` = the largest client count): for each N, N clients
   (asyncio, the official ``openai`` client, streaming) each send ``--per-client`` requests back to back.
   Throughput is completion tokens over the wall time from the first request to the last token; time to first
   token (TTFT) and time per output token after the first (TPOT) per request, p50 and p99.
3. **contended** (unless ``--no-contended``): HF and the 16-client row again beside a fixed background load
   (one process multiplying 256x256 matrices on one core), as a busy shared machine would be.

Greedy texts of the requests both sides ran are compared (``same text``). The table is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ---------------------------------------------------------------------------------------------- the model folder

def _corpus(rng: random.Random, words: list[str], n: int):
    for _ in range(n):
        yield " ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + rng.choice([".", "!", "?", ","])


def build_folder(path: str, quick: bool) -> str:
    """A random OPT (OPT-125M's shape, or a tiny one with ``quick``) and a BPE of its vocabulary."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    vocab = 2048 if quick else 50272
    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou")
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(80000)})
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(rng, words, 4000 if quick else 60000), trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "<pad>", "clean_up_tokenization_spaces": False}, f)
    shape = (dict(num_hidden_layers=2, hidden_size=64, ffn_dim=256, num_attention_heads=4) if quick else
             dict(num_hidden_layers=12, hidden_size=768, ffn_dim=3072, num_attention_heads=12))
    cfg = tf.OPTConfig(vocab_size=vocab, max_position_embeddings=2048, word_embed_proj_dim=shape["hidden_size"],
                       bos_token_id=0, eos_token_id=None, pad_token_id=2, **shape)
    torch.manual_seed(0)
    model = tf.OPTForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    return path


def make_prompts(folder: str, n: int, length: int) -> list[list[int]]:
    """``n`` different prompts of exactly ``length`` token ids (generated text, tokenized and cut)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    rng = random.Random(1)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"]
    out = []
    while len(out) < n:
        text = " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(length * 2))
        ids = tok.encode(text).ids
        if len(ids) >= length:
            out.append(ids[:length])
    return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# ---------------------------------------------------------------------------------------------- HF, one by one

def hf_baseline(folder: str, prompts: list[list[int]], gen_len: int, dtype: str) -> dict:
    import torch
    import transformers as tf
    from transformers.generation.streamers import BaseStreamer

    tf.utils.logging.set_verbosity_error()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch_dtype).eval()
    tok = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:  # the prompt first, then every new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def one(ids: list[int]) -> tuple[str, list[float], float]:
        clock, t0 = Clock(), time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False, streamer=clock,
                                 pad_token_id=2)
        return tok.decode(out[0, len(ids):], skip_special_tokens=True), clock.times[1:], t0

    one(prompts[0][:8])  # warm-up
    texts, ttft, tpot, t_start = [], [], [], time.perf_counter()
    for ids in prompts:
        text, stamps, t0 = one(ids)
        texts.append(text)
        ttft.append(stamps[0] - t0)
        tpot.append((stamps[-1] - stamps[0]) / max(1, len(stamps) - 1))
    wall = time.perf_counter() - t_start
    return {"tokens": gen_len * len(prompts), "wall": wall, "ttft": ttft, "tpot": tpot, "texts": texts,
            "requests": len(prompts)}


# ---------------------------------------------------------------------------------------------- the server

def start_server(folder: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flexspeed", "serve", "--model", folder, "--port", str(port), "--served-model-name",
           "bench", "--max-num-seqs", str(max(args.clients)), "--max-model-len",
           str(args.prompt_len + args.gen_len), "--max-queue", "4096", "--log-level", "warning", "--dtype", args.dtype]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not answer /health within 600 s")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)


async def _client(api, prompts: list[list[int]], gen_len: int, log: list) -> None:
    for ids in prompts:
        t0 = time.perf_counter()
        first, last, text, made = None, t0, [], 0
        stream = await api.completions.create(model="bench", prompt=ids, max_tokens=gen_len, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                made = chunk.usage.completion_tokens
            if chunk.choices:  # a token's text (a token that only completes a character comes with the next)
                last = time.perf_counter()
                first = first or last
                text.append(chunk.choices[0].text)
        # TPOT as vLLM's benchmark counts it: the time after the first token over the tokens after it
        log.append({"ids": ids, "text": "".join(text), "tokens": made, "ttft": first - t0,
                    "tpot": (last - first) / max(1, made - 1), "end": last})


async def run_clients(port: int, prompts: list[list[int]], n: int, per_client: int, gen_len: int) -> dict:
    import openai

    api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=3600)
    log: list = []
    share = [[prompts[(c * per_client + k) % len(prompts)] for k in range(per_client)] for c in range(n)]
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(api, mine, gen_len, log) for mine in share))
    wall = max(r["end"] for r in log) - t0
    await api.close()
    return {"tokens": sum(r["tokens"] for r in log), "wall": wall, "ttft": [r["ttft"] for r in log],
            "tpot": [r["tpot"] for r in log], "log": log, "requests": len(log)}


def _burn(stop) -> None:
    import numpy as np

    a = np.random.rand(256, 256)
    while not stop.is_set():
        a = a @ a
        a /= np.abs(a).max()


class BackgroundLoad:
    """One process multiplying matrices on one core until stopped (the contended rows)."""

    def __enter__(self) -> BackgroundLoad:
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self.proc = ctx.Process(target=_burn, args=(self.stop,), daemon=True)
        self.proc.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.proc.join(10)


# ---------------------------------------------------------------------------------------------- main

def _row(label: str, res: dict, base_tps: float | None, same: str) -> list[str]:
    tps = res["tokens"] / res["wall"]
    ratio = f"{tps / base_tps:.2f}x" if base_tps else "1.00x"
    ms = lambda v: f"{1000 * v:.0f}"  # noqa: E731
    return [label, str(res["requests"]), f"{tps:.1f}", ratio, ms(_percentile(res["ttft"], 50)),
            ms(_percentile(res["ttft"], 99)), f"{1000 * _percentile(res['tpot'], 50):.1f}",
            f"{1000 * _percentile(res['tpot'], 99):.1f}", same]


def _same(res: dict, hf: dict, hf_prompts: list[list[int]]) -> str:
    want = {tuple(p): t for p, t in zip(hf_prompts, hf["texts"])}
    checked = [r["text"] == want[tuple(r["ids"])] for r in res["log"] if tuple(r["ids"]) in want]
    return f"{sum(checked)}/{len(checked)}" if checked else "-"


def _print_table(rows: list[list[str]], args: argparse.Namespace) -> None:
    head = ["", "requests", "tok/s", "vs HF", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "same text"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print(f"\nprompt {args.prompt_len} tokens, answer {args.gen_len} tokens, {args.dtype}, torch threads "
          f"{args.threads or 'default'}, {os.cpu_count()} CPUs")
    for r in [head, *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a model folder (default: build a random OPT-125M-shape one)")
    p.add_argument("--clients", default="1,4,16,64", help="concurrent clients, comma separated")
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends back to back")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--hf-requests", type=int, default=6, help="requests HF generate runs one by one")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (HF here; the server's default)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--no-contended", action="store_true", help="skip the rows beside a background load")
    p.add_argument("--quick", action="store_true", help="a tiny model, clients 1 and 4, short requests")
    args = p.parse_args()
    if args.quick:
        args.clients, args.prompt_len, args.gen_len, args.hf_requests, args.no_contended = "1,4", 8, 8, 2, True
    args.clients = [int(c) for c in args.clients.split(",")]
    import torch

    from flexspeed.testing import free_port

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="flexspeed-serve-bench-")
    try:
        folder = args.model or build_folder(os.path.join(tmp, "model"), args.quick)
        prompts = make_prompts(folder, max(max(args.clients) * args.per_client, args.hf_requests), args.prompt_len)
        hf_prompts = prompts[:args.hf_requests]
        print(f"HF generate: {args.hf_requests} requests one by one", flush=True)
        hf = hf_baseline(folder, hf_prompts, args.gen_len, args.dtype)
        base = hf["tokens"] / hf["wall"]
        rows = [_row("HF generate, one by one", hf, None, "-")]
        port = args.port or free_port()
        server = start_server(folder, port, args)
        try:
            asyncio.run(run_clients(port, prompts[:2], 1, 1, args.gen_len))  # warm-up
            for n in args.clients:
                print(f"flexspeed serve: {n} clients x {args.per_client} requests", flush=True)
                res = asyncio.run(run_clients(port, prompts, n, args.per_client, args.gen_len))
                rows.append(_row(f"serve, {n} clients", res, base, _same(res, hf, hf_prompts)))
            if not args.no_contended:
                n = 16 if 16 in args.clients else args.clients[-1]
                with BackgroundLoad():
                    print("contended: HF and the 16-client row beside a background load", flush=True)
                    hf_c = hf_baseline(folder, hf_prompts, args.gen_len, args.dtype)
                    res = asyncio.run(run_clients(port, prompts, n, args.per_client, args.gen_len))
                base_c = hf_c["tokens"] / hf_c["wall"]
                rows.append(_row("HF generate, contended", hf_c, None, "-"))
                rows.append(_row(f"serve, {n} clients, contended", res, base_c, _same(res, hf_c, hf_prompts)))
        finally:
            server.terminate()
            server.wait(60)
        _print_table(rows, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
