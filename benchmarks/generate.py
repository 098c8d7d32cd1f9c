"""Generation throughput: flexspeed configurations against HF ``generate``, side by side.

Random-weight models of OPT-125M shape (12 layers, hidden 768, ffn 3072, 12 heads, vocab 50272)
and GPT-2 shape (12 layers, 768, 12 heads, vocab 50257); batch 1 and 16, prompt 128, 32 new
tokens (eos suppressed so every run makes all 32), 2 threads. Every configuration is warmed up,
then the repetitions go round-robin over the configurations so machine noise hits them all;
medians are reported. Configurations:

- ``HF fp32`` / ``HF bf16``: ``model.generate(do_sample=False)``.
- ``fs fp32`` / ``fs bf16``: ``flexspeed.init_inference(dtype=...)`` + ``engine.generate``
  without injection: a runner shadows the model's own modules (nothing copied) and decodes
  through the native kernel where it is built (else the HF cache API driven by flexspeed's loop).
- ``inject fp32`` / ``inject bf16``: ``replace_with_kernel_inject=True`` (fused layers, static KV cache).
- ``inject bf16 int8`` / ``int4``: plus weight quantization (int4: group 64).
- ``inject bf16 compiled`` (``--compile``): decode step under ``torch.compile``.
- Every configuration above runs flexspeed's default ``decode_path="auto"``: its runner measures
  its single-token steps on the native kernel and on torch's path and runs the faster (the
  decision and the times it was made on are printed after the tables). For comparison:
- ``inject bf16 native-pinned`` / ``inject fp32 native-pinned``: ``decode_path="native"``.
- ``inject bf16 torch-only`` / ``inject fp32 torch-only``: ``decode_path="torch"``: injection
  with the native decode kernel off (torch's kernels on oneDNN-packed weights), to show what the
  kernel adds.
- ``tp2 inject bf16``: tensor parallel over 2 ranks (gloo, 1 thread each), via ``run_ranks``.

Columns: tok/s = batch x new / wall time of one ``generate`` call; ``vs HF`` against HF in the same
compute dtype; ``weights MB`` resident; ``read MB`` = weight bytes read per decode step (every
Linear/norm weight plus ``lm_head``; embeddings read one row per token and are left out);
``GB/s`` = the read bandwidth the floor is taken against: the median of ``Tensor.sum`` samples
over a 512 MB buffer taken between the timed calls (see :class:`BandwidthProbe`); tp 2's floor
is the single model's, as the two ranks share one memory bus and together read every weight
once; ``floor ms`` = read bytes / that bandwidth; ``decode ms`` = (full call - prompt-only
call) / (new - 1); ``x floor`` = decode ms / floor ms.

Two conditions, interleaved in the same run: ``idle`` (whatever else the machine runs) and
``contended``: a fixed background load the script starts itself, the same for every contender
(:class:`BackgroundLoad`: ``--load-procs`` processes that each sleep ~``--load-sleep-ms`` and then
spin ~``--load-burst-ms``, many times a second, so they keep waking and taking a core for a short
while, as test runs and builds do). The load processes are started once and stopped (SIGSTOP)
during the idle calls, resumed (SIGCONT) during the contended ones; every repetition measures
every configuration in both conditions. The contended table's ``vs torch`` is tok/s against the
torch-only injection in the same dtype (the native path should never lose to it), ``dec vs
torch`` the same for the decode steps alone (the prompt of an un-injected model runs the model's
own forward) and the native
kernel's thread statistics (time slices its threads lost inside calls, re-measurements and
switches of its adaptive thread count).

    python benchmarks/generate.py [--quick] [--models opt,gpt2,neox] [--batches 1,16] [--reps 3] [--compile] [--no-tp]
                                  [--no-contended] [--load-procs 4] [--load-burst-ms 2] [--load-sleep-ms 6]
"""

from __future__ import annotations

import os

# On a shared 2-core VM, OpenMP threads that spin while waiting stall every parallel region by a
# scheduler time slice (~8 ms) whenever another process holds the other core; passive waiting
# avoids that. Set before torch loads (it applies to HF and flexspeed alike); override by exporting it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

SHAPES = {
    "opt": dict(layers=12, hidden=768, ffn=3072, heads=12, vocab=50272),
    "gpt2": dict(layers=12, hidden=768, ffn=3072, heads=12, vocab=50257),
    "neox": dict(layers=12, hidden=768, ffn=3072, heads=12, vocab=50304),  # Pythia-160M (rotary_pct 0.25)
}
QUICK = dict(layers=2, hidden=64, ffn=256, heads=4, vocab=512)


def build(name: str, shape: dict) -> nn.Module:
    """An HF model of the given shape, random weights (seeded), fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    if name == "opt":
        cfg = tf.OPTConfig(num_hidden_layers=shape["layers"], hidden_size=shape["hidden"], ffn_dim=shape["ffn"],
                           num_attention_heads=shape["heads"], vocab_size=shape["vocab"],
                           word_embed_proj_dim=shape["hidden"], max_position_embeddings=2048)
        return tf.OPTForCausalLM(cfg).eval()
    if name == "neox":  # partial rotary, parallel residual
        cfg = tf.GPTNeoXConfig(num_hidden_layers=shape["layers"], hidden_size=shape["hidden"],
                               intermediate_size=shape["ffn"], num_attention_heads=shape["heads"],
                               vocab_size=shape["vocab"], rotary_pct=0.25, use_parallel_residual=True,
                               max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)
        return tf.GPTNeoXForCausalLM(cfg).eval()
    cfg = tf.GPT2Config(n_layer=shape["layers"], n_embd=shape["hidden"], n_inner=shape["ffn"], n_head=shape["heads"],
                        vocab_size=shape["vocab"], n_positions=1024, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg).eval()


def read_bandwidth(mb: int = 512) -> float:
    """Memory read bandwidth in bytes/s: best of 5 sums over an ``mb`` MB fp32 tensor."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(5))
    return x.numel() * 4 / best


class BandwidthProbe:
    """Read bandwidth sampled *during* the run: best of 3 ``Tensor.sum`` over one 512 MB buffer,
    right before and right after each configuration's timed calls in every repetition.

    On this VM the whole machine's read bandwidth moves with its neighbours' load (the same
    512 MB sum: 31-38 GB/s in one process, 62-68 GB/s in the next, minutes apart; 29-70 GB/s
    within one run), so a bandwidth measured once, or one median for all configurations, can
    belong to another state than a configuration's decode steps; each configuration's floor
    uses the median of the samples taken beside its own calls.
    """

    def __init__(self, mb: int) -> None:
        self.x = torch.ones(mb * 2**20 // 4)
        self.x.sum()
        self.samples: list[float] = []

    def sample(self) -> float:
        best = min(_timed(lambda: self.x.sum()) for _ in range(3))
        self.samples.append(self.x.numel() * 4 / best)
        return self.samples[-1]

    def median(self) -> float:
        return statistics.median(self.samples)


_LOAD_SCRIPT = """
import os, random, sys, time
burst, pause, seed = float(sys.argv[1]) / 1e3, float(sys.argv[2]) / 1e3, int(sys.argv[3])
rng = random.Random(seed)
while True:
    time.sleep(pause * rng.uniform(0.5, 1.5))
    end = time.perf_counter() + burst * rng.uniform(0.5, 1.5)
    while time.perf_counter() < end:
        pass
"""


class BackgroundLoad:
    """A fixed, bursty background load: ``procs`` processes that each sleep ``sleep_ms`` and then
    spin ``burst_ms`` (both jittered +-50%, seeded), over and over: they wake ~100-200 times a
    second and each takes a core for a moment, as parallel test runs and builds do (the load that
    made the kernel's spinning workers lose whole time slices). ``pause()`` stops them (SIGSTOP),
    ``resume()`` lets them run; ``close()`` ends them. Only the processes it started are touched."""

    def __init__(self, procs: int, burst_ms: float, sleep_ms: float) -> None:
        # each in its own session, as other users' and services' processes are: with the kernel's
        # autogroup scheduling (Linux's default on desktops and many servers) they then compete
        # with this process as separate groups, not as its own threads
        self.procs = [subprocess.Popen([sys.executable, "-c", _LOAD_SCRIPT, str(burst_ms), str(sleep_ms), str(i)],
                                       stdin=subprocess.DEVNULL, start_new_session=True)
                      for i in range(procs)]
        self.running = True
        self.describe = f"{procs} processes x (sleep ~{sleep_ms:g} ms, spin ~{burst_ms:g} ms)"
        self.pause()

    def _signal(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def pause(self) -> None:
        if self.running:
            self._signal(signal.SIGSTOP)
            self.running = False

    def resume(self) -> None:
        if not self.running:
            self._signal(signal.SIGCONT)
            self.running = True
            time.sleep(0.05)  # let them reach their sleep/spin rhythm

    def close(self) -> None:
        self._signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _summary(full: list[float], pre: list[float]) -> tuple[float, float, float]:
    """(median full call, median prompt-only call, median of the per-repetition differences): the
    decode time is taken from each repetition's own pair of calls, measured back to back, so a
    drift of the machine between repetitions (this VM's bandwidth moves by 2x within minutes)
    does not land in it as it would in the difference of the two medians."""
    return statistics.median(full), statistics.median(pre), statistics.median(f - p for f, p in zip(full, pre))


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(resident bytes of all weights, bytes read per decode step).

    oneDNN-packed weights (``PackedLinear``) live outside the parameters; they are added.
    """
    packed = sum(m.weight_bytes() for m in model.modules() if type(m).__name__ == "PackedLinear")
    resident = _unique_bytes(list(model.parameters()) + list(model.buffers())) + packed
    from flexspeed.inference.kernels import get_runner

    runner = get_runner(model)
    if runner is not None and runner.native_reason() is None:  # the native kernel's row-major int4 scales
        resident += _unique_bytes(runner._native.keep)
    read = []
    for mod in model.modules():
        kind = type(mod).__name__
        if isinstance(mod, nn.Linear) or kind in ("Conv1D", "QuantLinear", "PackedLinear") or "Norm" in kind:
            read += list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
    return resident, _unique_bytes(read) + packed


def configurations(name: str, shape: dict, compile_decode: bool,
                   only: set[str] | None = None) -> list[tuple[str, str, nn.Module, Callable]]:
    """(label, dtype for the HF ratio, model, ``run(ids, new)``) for every configuration (those in
    ``only`` if given; HF's and the torch-only one are always built: the ratios need them)."""
    import flexspeed

    base = build(name, shape)
    hf16 = copy.deepcopy(base).to(torch.bfloat16)

    def hf(model):
        return lambda ids, new: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                               min_new_tokens=new, do_sample=False, pad_token_id=0)

    def fs(label, **kw):
        engine = flexspeed.init_inference(copy.deepcopy(base), **kw)
        ENGINES[label] = engine
        return engine.module, lambda ids, new: engine.generate(ids, max_new_tokens=new, min_new_tokens=new)

    out = [("HF fp32", "fp32", base, hf(base)), ("HF bf16", "bf16", hf16, hf(hf16))]
    specs = [("fs fp32", "fp32", dict(dtype="fp32")), ("fs bf16", "bf16", dict(dtype="bf16")),
             ("inject fp32", "fp32", dict(dtype="fp32", replace_with_kernel_inject=True)),
             ("inject bf16", "bf16", dict(dtype="bf16", replace_with_kernel_inject=True))]
    for bits in (8, 4):
        specs.append((f"inject bf16 int{bits}", "bf16", dict(dtype="bf16", replace_with_kernel_inject=True,
                                                              quant={"enabled": True, "weight": {"num_bits": bits}})))
    for dt in ("fp32", "bf16"):  # the two paths the adaptive choice picks from, each pinned
        specs.append((f"inject {dt} native-pinned", dt, dict(dtype=dt, replace_with_kernel_inject=True,
                                                             decode_path="native")))
    for label, dt, kw in specs:
        if only is None or label in only:
            out.append((label, dt, *fs(label, **kw)))
    for dt in ("fp32", "bf16"):  # torch's kernels, packed weights (always built: the ratios need them)
        label = f"inject {dt} torch-only"
        out.append((label, dt, *fs(label, dtype=dt, replace_with_kernel_inject=True, decode_path="torch")))
    if compile_decode and (only is None or "inject bf16 compiled" in only):
        from flexspeed.inference.kernels import get_runner

        model, run = fs("inject bf16 compiled", dtype="bf16", replace_with_kernel_inject=True)
        get_runner(model).compile_decode = True
        out.append(("inject bf16 compiled", "bf16", model, run))
    return out


ENGINES: dict[str, object] = {}
"""label -> the inference engine of a flexspeed configuration (its runner's decode-path decisions)."""


def decode_paths() -> dict[str, str]:
    """label -> what each configuration's runner decided about its decode path, and on what times."""
    out = {}
    for label, engine in ENGINES.items():
        paths = getattr(engine.runner, "paths", None)
        out[label] = paths.describe() if paths is not None else engine.runner.describe()
    return out


def measure(configs, batch: int, prompt: int, new: int, reps: int, vocab: int,
            probe: BandwidthProbe | None = None, bandwidth: dict | None = None,
            load: BackgroundLoad | None = None, contended: dict | None = None) -> dict[str, tuple[float, float, float]]:
    """{label: :func:`_summary` of its calls (full, prompt-only, paired difference)}, round-robin over configs.

    The bandwidth ``probe`` is sampled right before and right after every configuration's calls
    (idle only); ``bandwidth[label]`` gets the median of that configuration's own samples. With
    a ``load``, every repetition measures every configuration again with the load running, into
    ``contended`` (same format), and the native kernel's thread counters of those calls into
    ``contended["_native"]``."""
    from flexspeed.inference import native

    ids = torch.randint(1, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    conditions = ["idle"] + (["contended"] if load is not None else [])
    full = {c: {cfg[0]: [] for cfg in configs} for c in conditions}
    pre = {c: {cfg[0]: [] for cfg in configs} for c in conditions}
    own: dict[str, list[float]] = {}
    stats: dict[str, dict] = {}
    with torch.inference_mode():
        for _, _, _, run in configs:  # warm-up (and compilation)
            run(ids, 2)
        for _ in range(reps):
            for cond in conditions:
                if load is not None:
                    load.resume() if cond == "contended" else load.pause()
                for label, _, _, run in configs:
                    if probe is not None and cond == "idle":
                        own.setdefault(label, []).append(probe.sample())
                    before = native.pool_stats() if cond == "contended" else None
                    full[cond][label].append(_timed(lambda: run(ids, new)))
                    pre[cond][label].append(_timed(lambda: run(ids, 1)))
                    if before is not None:
                        after = native.pool_stats()
                        acc = stats.setdefault(label, {})
                        for k in ("calls", "preempted", "explored", "switches", "sleeps"):
                            acc[k] = acc.get(k, 0) + after[k] - before[k]
                    if probe is not None and cond == "idle":
                        own[label].append(probe.sample())
        if load is not None:
            load.pause()
    if bandwidth is not None:
        bandwidth.update({k: statistics.median(v) for k, v in own.items()})
    if contended is not None and load is not None:
        contended.update({k: _summary(full["contended"][k], pre["contended"][k]) for k in full["contended"]})
        contended["_native"] = stats
    return {k: _summary(full["idle"][k], pre["idle"][k]) for k in full["idle"]}


def _tp_worker(rank: int, world: int, name: str, shape: dict, batch: int, prompt: int, new: int,
               reps: int) -> tuple[float, float, float]:
    import flexspeed

    warnings.filterwarnings("ignore")
    engine = flexspeed.init_inference(build(name, shape), dtype="bf16", replace_with_kernel_inject=True,
                                      tensor_parallel={"tp_size": world})
    ids = torch.randint(1, shape["vocab"], (batch, prompt), generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        engine.generate(ids, max_new_tokens=2, min_new_tokens=2)
        full, pre = [], []
        for _ in range(reps):
            full.append(_timed(lambda: engine.generate(ids, max_new_tokens=new, min_new_tokens=new)))
            pre.append(_timed(lambda: engine.generate(ids, max_new_tokens=1)))
    return _summary(full, pre)


def measure_tp(name: str, shape: dict, batch: int, prompt: int, new: int,
               reps: int) -> tuple[float, float, float] | str:
    """:func:`_summary` of the calls at tp 2, or the reason it could not run."""
    try:
        from flexspeed.testing import run_ranks

        return run_ranks(_tp_worker, 2, args=(name, shape, batch, prompt, new, reps), threads=1, timeout=900)[0]
    except Exception as exc:  # report, don't abort the table
        return f"n/a ({type(exc).__name__}: {str(exc).splitlines()[-1][:80] if str(exc) else ''})"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, one repetition (smoke test)")
    p.add_argument("--models", default="opt,gpt2")
    p.add_argument("--batches", default=None, help="comma list (default 1,16; quick: 1,2)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--prompt", type=int, default=None)
    p.add_argument("--new", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="add a torch.compile'd decode configuration")
    p.add_argument("--no-tp", action="store_true", help="skip the tensor-parallel row")
    p.add_argument("--configs", default=None, help="comma list of configuration labels to run (default all; HF and "
                                                   "torch-only always run)")
    p.add_argument("--no-contended", action="store_true", help="skip the contended condition")
    p.add_argument("--load-procs", type=int, default=4, help="background load: processes (contended condition)")
    p.add_argument("--load-burst-ms", type=float, default=2.0, help="background load: spin per wake-up, ms")
    p.add_argument("--load-sleep-ms", type=float, default=6.0, help="background load: sleep between bursts, ms")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        sys.exit("benchmarks/generate.py needs transformers (pip install flexspeed[bench])")
    torch.set_num_threads(args.threads)
    quick = args.quick
    batches = [int(b) for b in (args.batches or ("1,2" if quick else "1,16")).split(",")]
    reps = args.reps or (1 if quick else 3)
    prompt, new = args.prompt or (16 if quick else 128), args.new or (8 if quick else 32)
    bw = read_bandwidth(64 if quick else 512)
    print(f"read bandwidth at start {bw / 1e9:.1f} GB/s, {args.threads} threads, prompt {prompt}, {new} new tokens, "
          f"median of {reps}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    load = None if args.no_contended else BackgroundLoad(args.load_procs, args.load_burst_ms, args.load_sleep_ms)
    if load is not None:
        print(f"contended condition: {load.describe}, the same for every configuration", flush=True)
    rows: list[dict] = []
    try:
        for name in args.models.split(","):
            ENGINES.clear()
            shape = QUICK if quick else SHAPES[name]
            configs = configurations(name, shape, args.compile,
                                     set(args.configs.split(",")) if args.configs else None)
            sizes = {label: weight_bytes(model) for label, _, model, _ in configs}
            bws = {label: bw for label, _, _, _ in configs}
            for batch in batches:
                probe = BandwidthProbe(64 if quick else 512)
                own: dict[str, float] = {}
                contended: dict = {}
                times = measure(configs, batch, prompt, new, reps, shape["vocab"], probe, own, load, contended)
                stats = contended.pop("_native", {})
                bw = probe.median()
                bws = {label: own.get(label, bw) for label in bws}  # each configuration's floor from its own samples
                print(f"  {name} batch {batch}: read bandwidth during the run {min(probe.samples) / 1e9:.1f}-"
                      f"{max(probe.samples) / 1e9:.1f} GB/s, median {bw / 1e9:.1f} ({len(probe.samples)} samples)",
                      flush=True)
                if not args.no_tp and not quick and (not args.configs or "tp2 inject bf16" in args.configs):
                    before = probe.sample()
                    times["tp2 inject bf16"] = measure_tp(name, shape, batch, prompt, new, reps)
                    # two ranks on one machine share its memory bus: together they read every weight once
                    sizes["tp2 inject bf16"] = sizes["HF bf16"]  # the same bf16 weights (HF always runs)
                    bws["tp2 inject bf16"] = (before + probe.sample()) / 2  # sampled beside the ranks' run
                    if load is not None:
                        load.resume()
                        try:
                            contended["tp2 inject bf16"] = measure_tp(name, shape, batch, prompt, new, reps)
                        finally:
                            load.pause()
                for cond, table in (("idle", times), ("contended", contended)):
                    rows += _rows(cond, name, batch, new, table, sizes, bws, stats)
                print(f"  {name} batch {batch} done; decode paths:", flush=True)
                for label, text in decode_paths().items():
                    print(f"    {label:24} {text}", flush=True)
    finally:
        if load is not None:
            load.close()
    _print_table([r for r in rows if r["condition"] == "idle"], "idle")
    if load is not None:
        _print_contended([r for r in rows if r["condition"] == "contended"], load.describe)
    return rows


def _rows(cond: str, name: str, batch: int, new: int, times: dict, sizes: dict, bws: dict, stats: dict) -> list[dict]:
    if not times:
        return []
    rate = {k: batch * new / v[0] for k, v in times.items() if not isinstance(v, str)}
    decode_s = {k: v[2] / max(1, new - 1) for k, v in times.items() if not isinstance(v, str)}
    hf_rate = {dt: rate[f"HF {dt}"] for dt in ("fp32", "bf16")}
    out = []
    for label, value in times.items():
        dt = "fp32" if "fp32" in label else "bf16"
        resident, read = sizes[label]
        row = dict(condition=cond, model=name, config=label, batch=batch, weights_mb=resident / 2**20,
                   read_mb=read / 2**20, bw_gbs=bws[label] / 1e9, floor_ms=read / bws[label] * 1e3)
        if isinstance(value, str):
            row.update(note=value)
        else:
            full, pre, diff = value
            decode = diff / max(1, new - 1)
            row.update(tok_s=rate[label], vs_hf=rate[label] / hf_rate[dt], decode_ms=decode * 1e3,
                       x_floor=decode * 1e3 / row["floor_ms"], prefill_s=pre,
                       vs_torch=rate[label] / rate.get(f"inject {dt} torch-only", rate["inject bf16 torch-only"]),
                       decode_vs_torch=decode_s.get(f"inject {dt} torch-only", decode_s["inject bf16 torch-only"])
                       / decode)
            pinned = f"inject {dt} native-pinned"
            if pinned in rate:
                row["vs_native"] = rate[label] / rate[pinned]
            if label in stats:
                row["native"] = stats[label]
        out.append(row)
    return out


def _print_table(rows: list[dict], title: str) -> None:
    head = (f"{'model':6} {'config':24} {'batch':>5} {'tok/s':>8} {'vs HF':>6} {'weights MB':>10} {'read MB':>8} "
            f"{'GB/s':>5} {'floor ms':>8} {'decode ms':>9} {'x floor':>7} {'prefill s':>9}")
    print(f"\n{title}\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if "note" in r:
            print(f"{r['model']:6} {r['config']:24} {r['batch']:>5} {r['note']}")
            continue
        print(f"{r['model']:6} {r['config']:24} {r['batch']:>5} {r['tok_s']:>8.1f} {r['vs_hf']:>6.2f} "
              f"{r['weights_mb']:>10.1f} {r['read_mb']:>8.1f} {r['bw_gbs']:>5.1f} {r['floor_ms']:>8.2f} {r['decode_ms']:>9.2f} "
              f"{r['x_floor']:>7.2f} {r['prefill_s']:>9.3f}")


def _print_contended(rows: list[dict], load: str) -> None:
    head = (f"{'model':6} {'config':24} {'batch':>5} {'tok/s':>8} {'vs HF':>6} {'vs torch':>8} {'vs native':>9} "
            f"{'decode ms':>9} "
            f"{'dec vs torch':>12} "
            f"{'lost slices':>11} {'re-measured':>11} {'switches':>8} {'slept':>7} {'calls':>7}")
    print(f"\ncontended ({load})\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if "note" in r:
            print(f"{r['model']:6} {r['config']:24} {r['batch']:>5} {r['note']}")
            continue
        n = r.get("native") or {}
        native = (f"{n.get('preempted', 0):>11} {n.get('explored', 0):>11} {n.get('switches', 0):>8} "
                  f"{n.get('sleeps', 0):>7} {n.get('calls', 0):>7}") if n.get("calls") else f"{'-':>11}"
        vs_native = f"{r['vs_native']:>9.2f}" if "vs_native" in r else f"{'-':>9}"
        print(f"{r['model']:6} {r['config']:24} {r['batch']:>5} {r['tok_s']:>8.1f} {r['vs_hf']:>6.2f} "
              f"{r['vs_torch']:>8.2f} {vs_native} {r['decode_ms']:>9.2f} {r['decode_vs_torch']:>12.2f} {native}")


if __name__ == "__main__":
    main()
