"""The native decode kernel (flexspeed/inference/csrc/decode.c) against torch references.

References and tolerances (relative to the largest |logit|):
- fp32 weights: the torch fused runner in fp32, 1e-5 (different summation order only).
- bf16 weights: fp32 math on the same bf16 weights, 2e-2 (the kernel rounds the products'
  inputs to bf16, as torch's bf16 products do; measured 4-7e-3).
- int8 weights: fp32 math on the dequantized weights (``QuantLinear.kernel = "dequant"``), 1e-3
  (activations quantized to 15 bits per row: measured ~5e-5 per product).
- int4 weights: the kernel quantizes activations to int8 per group of 64 (as llama.cpp's Q4 x Q8
  product), ~1% per product; its distance from the exact dequantized math must stay under 35% of
  the distance int4 weights put between that math and the unquantized model (measured on
  OPT-125M-shaped layers: 0.024 against 0.24, Llama with GQA 0.047 against 0.31).
Each comparison is one decode step from the same KV cache (the prompt runs once, on torch).
Plus: left padding and GQA/RoPE, greedy tokens equal to the torch path in fp32, the portable
(non-AVX-512) build, rebuilding after the model changes, and every fallback to torch.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import flexspeed
from flexspeed.inference import native
from flexspeed.inference.kernels import get_runner, inject_kernels
from flexspeed.inference.quant import QuantLinear, quantize_linears

tf = pytest.importorskip("transformers")
tf.utils.logging.set_verbosity_error()

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native kernel is not built")

V = 97


def build(name: str, std: float = 0.2, width: int = 64) -> nn.Module:
    """A tiny random model (init std 0.2: logits far from flat), or a wider one with ``std`` 0.02."""
    torch.manual_seed(0)
    if width != 64:
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=width, intermediate_size=2 * width,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                                  initializer_range=std)).eval()
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=64,
                                                bos_token_id=1, eos_token_id=2, initializer_range=0.2)).eval()
    if name in ("opt", "opt_postln"):
        post = name == "opt_postln"
        return tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                              vocab_size=V, max_position_embeddings=64, init_std=0.2,
                                              word_embed_proj_dim=32 if post else 64,
                                              do_layer_norm_before=not post)).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                              initializer_range=0.2)).eval()


def engine_for(name: str, dtype: str, bits: int | None, **shape):
    kw: dict = dict(dtype=dtype, replace_with_kernel_inject=True, decode_path="native")  # the kernel itself
    if bits:
        kw["quant"] = {"enabled": True, "weight": {"num_bits": bits}}
    return flexspeed.init_inference(build(name, **shape), **kw)


def prefill(model: nn.Module, batch: int = 3) -> tuple:
    """A left-padded prompt run through the torch path: (ids, pos, key_mask, cache)."""
    runner = get_runner(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (batch, 10), generator=g)
    mask = torch.ones(batch, 10, dtype=torch.bool)
    mask[0, :3] = False
    key_mask = torch.cat([mask, torch.ones(batch, 6, dtype=torch.bool)], 1)
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        cache = runner.new_cache(batch, 16)
        runner(ids, pos, cache, 0, key_mask)
    return ids, pos, key_mask, cache


def step(model: nn.Module, native_on: bool, state: tuple) -> torch.Tensor:
    """fp32 logits of one decode step from a copy of ``state``'s cache."""
    ids, pos, key_mask, cache = state
    runner = get_runner(model)
    runner.native_decode = native_on
    # torch's path reads the same values in fp32 (its attention stays exact on a bf16 model's cache)
    dt = None if native_on else torch.float32
    cache = type(cache)([k.to(dt or k.dtype, copy=True) for k in cache.k], [v.to(dt or v.dtype, copy=True)
                                                                            for v in cache.v])
    with torch.inference_mode():
        return runner(ids[:, -1:], pos[:, -1:] + 1, cache, 10, key_mask).float()


def decode_logits(model: nn.Module, native_on: bool, batch: int = 3) -> torch.Tensor:
    """Prompt (torch path) then one decode step."""
    return step(model, native_on, prefill(model, batch))


def reference(model: nn.Module) -> nn.Module:
    """The same weights in fp32 on torch's kernels (quantized layers dequantize exactly)."""
    ref = copy.deepcopy(model).float()
    for mod in ref.modules():
        if isinstance(mod, QuantLinear):
            mod.kernel = "dequant"
    return ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", ["opt", "gpt2", "llama"])
@pytest.mark.parametrize("dtype,bits,tol", [("fp32", None, 1e-5), ("bf16", None, 2e-2), ("fp32", 8, 1e-3),
                                            ("bf16", 8, 2e-2), ("fp32", 4, 0.35), ("bf16", 4, 0.35)])
def test_decode_step_matches_reference(name: str, dtype: str, bits: int | None, tol: float) -> None:
    """One decode step from the same cache: the kernel against fp32 math on the same weights
    (bf16 models: the new token's embedding is bf16 on the kernel's side, fp32 on the reference's;
    int4 on these std-0.2 toy models: a loose bound, the real one is the next test's)."""
    engine = engine_for(name, dtype, bits)
    runner = get_runner(engine.module)
    assert runner.native_reason() is None
    state = prefill(engine.module)
    assert state[3].k[0].dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)  # the kernel's cache
    got = step(engine.module, True, state)
    want = step(reference(engine.module), False, state)
    assert got.dtype == torch.float32 and got.shape == want.shape == (3, 1, V)
    assert rel_err(got, want) <= tol, rel_err(got, want)
    if tol == 1e-5:
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_int4_activation_error_is_a_fraction_of_the_weight_error(dtype: str) -> None:
    """int8 activations (per group of 64) add a fraction of the error int4 weights cause: on a
    normally initialised model with several groups per row (Llama, GQA, hidden 256)."""
    engine = engine_for("llama", dtype, 4, std=0.02, width=256)
    state = prefill(engine.module)
    got = step(engine.module, True, state)
    exact = step(reference(engine.module), False, state)
    unquantized = step(reference(engine_for("llama", dtype, None, std=0.02, width=256).module), False, state)
    own = rel_err(exact, unquantized)
    assert rel_err(got, exact) <= 0.35 * own, (rel_err(got, exact), own)


def test_int4_quantized_for_the_kernel_in_plain_order() -> None:
    engine = engine_for("opt", "bf16", 4)
    layouts = {m.layout for m in engine.module.modules() if isinstance(m, QuantLinear)}
    assert layouts == {"plain"}


@pytest.mark.parametrize("name", ["opt", "gpt2", "llama"])
def test_greedy_tokens_equal_torch_path_fp32(name: str) -> None:
    engine = engine_for(name, "fp32", None)
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    runner = get_runner(engine.module)
    got = engine.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12)
    runner.native_decode = False
    want = engine.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(got, want)


def test_structs_follow_model_changes() -> None:
    """Quantizing or re-casting after the first step rebuilds the kernel's view of the weights."""
    model = inject_kernels(build("llama"), torch.float32)
    runner = get_runner(model)
    first = decode_logits(model, True)
    assert rel_err(first, decode_logits(model, False)) <= 1e-5
    quantize_linears(model, 8, int4_layout="plain")  # replaces every Linear: new modules, new pointers
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.kernel = "dequant"
    assert rel_err(decode_logits(model, True), decode_logits(reference(model), False)) <= 1e-3
    model.to(torch.bfloat16)  # swaps param.data in place (same Parameter objects)
    runner.cache_dtype = None
    assert rel_err(decode_logits(model, True), decode_logits(reference(model), False)) <= 2e-2


def test_fallbacks_name_their_reason() -> None:
    post = inject_kernels(build("opt_postln"))
    assert "post-norm" in get_runner(post).native_reason()
    assert decode_logits(post, True).shape == (3, 1, V)  # runs on torch
    blocked = quantize_linears(inject_kernels(build("opt"), native=False), 4)  # aten's blocked int4 order
    reason = get_runner(blocked).native_reason()
    assert reason == "native_decode is off"
    get_runner(blocked).native_decode = True
    if any(m.layout != "plain" for m in blocked.modules() if isinstance(m, QuantLinear)):
        assert "blocked order" in get_runner(blocked).native_reason()
    compiled = inject_kernels(build("opt"), compile_decode=True)
    assert get_runner(compiled).native_reason() == "compile_decode is on"


def test_batches_above_the_limit_run_on_torch(monkeypatch) -> None:
    model = inject_kernels(build("gpt2"), torch.float32)
    runner = get_runner(model)
    calls = []
    runner.native_reason()
    monkeypatch.setattr(runner._native, "forward", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("native path used")))
    runner.native_max_batch = 2
    decode_logits(model, True, batch=3)  # 3 rows > 2: the torch path
    assert not calls


def test_bad_cache_is_rejected() -> None:
    model = inject_kernels(build("opt"), torch.float32)
    runner = get_runner(model)
    runner.native_reason()
    x = torch.zeros(1, 1, 64)
    k = [torch.zeros(1, 4, 8, 16)]  # one layer's buffers for a two-layer model
    with pytest.raises(ValueError, match="one contiguous fp32 or bf16 key and value buffer per layer"):
        runner._native.forward(x, k, k, 0, None, None)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 portable target")
def test_portable_build_matches(portable_build) -> None:
    """The plain-C path (no AVX-512), built for generic x86-64, is fp32 math on the stored weights:
    it matches the exact reference (dequantized weights, fp32) within 1e-5 for every format."""
    script = (
        "import json\n"
        "from test_native import engine_for, prefill, step, reference, rel_err\n"
        "from flexspeed.inference import native\n"
        "assert native.library().fs_fast_path() == 0\n"
        "out = {}\n"
        "for dt, bits in (('fp32', None), ('fp32', 8), ('fp32', 4)):\n"
        "    m = engine_for('llama', dt, bits).module\n"
        "    state = prefill(m)\n"
        "    out[f'{dt}-{bits}'] = rel_err(step(m, True, state), step(reference(m), False, state))\n"
        "print(json.dumps(out))\n")
    errors = portable_build(script, os.path.dirname(__file__))
    assert errors and all(e <= 1e-5 for e in errors.values()), errors


def test_disabled_and_failed_builds(monkeypatch, tmp_path) -> None:
    try:
        monkeypatch.setenv("FLEXSPEED_NATIVE", "0")
        native.library.cache_clear()
        assert native.library() is None
        model = inject_kernels(build("opt"))
        assert "not available" in get_runner(model).native_reason()
        monkeypatch.delenv("FLEXSPEED_NATIVE")
        monkeypatch.setenv("FLEXSPEED_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("FLEXSPEED_NATIVE_MARCH", "no-such-cpu")  # the compiler rejects it
        native.library.cache_clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.library() is None
        built = [str(w.message) for w in caught if "was not built" in str(w.message)]
        assert len(built) == 1 and "-march=no-such-cpu" in built[0] and "apt-get install gcc" in built[0], built
        assert native.status()["state"] == "build failed" and "-march=no-such-cpu" in native.status()["command"]
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    assert native.library() is not None


@pytest.mark.parametrize("name", ["opt", "gpt2", "llama"])
def test_unfused_model_decodes_natively_without_being_modified(name: str) -> None:
    """Without kernel injection, generation shadows the model's own modules: q/k/v (and gate/up)
    side by side, GPT-2's Conv1D read transposed; nothing is copied or replaced."""
    from flexspeed.inference.kernels import FusedDecoderLayer, build_runner
    from flexspeed.inference.generation import generate

    model = build(name)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    runner = build_runner(model)
    assert runner is not None and runner.native_reason() is None
    state = prefill_with(runner)
    got = step_with(runner, True, state)
    want = step_with(runner, False, state)
    assert rel_err(got, want) <= 1e-5
    for width in (8, 40):  # 40: the prompt's projections through oneDNN (GPT-2's Conv1D over its transposed view)
        ids = torch.randint(3, V, (2, width), generator=torch.Generator().manual_seed(3))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        out = generate(model, ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8)
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                            pad_token_id=1)
        assert torch.equal(out, hf)
    assert not any(isinstance(m, FusedDecoderLayer) for m in model.modules())
    assert before == {n: p.data_ptr() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 72, 136])  # outputs in whole vector blocks, or not (72: 216, 72, 288)
def test_transposed_products_of_any_width(width: int, dtype: torch.dtype) -> None:
    """GPT-2's Conv1D weights (in, out), read transposed by the kernel: its step matches torch's for
    widths whose outputs fill the vector blocks and for widths that leave some to the scalar tail."""
    from flexspeed.inference.kernels import build_runner

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=width, n_head=4, vocab_size=V, n_positions=64,
                                             initializer_range=0.2)).eval().to(dtype)
    runner = build_runner(model)
    assert runner is not None and runner.native_reason() is None
    state = prefill_with(runner)
    got = step_with(runner, True, state)
    want = step_with(runner, False, state)
    assert rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 2e-2)


def prefill_with(runner) -> tuple:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 10), generator=g)
    pos = torch.arange(10).expand(2, 10)
    with torch.inference_mode():
        cache = runner.new_cache(2, 16)
        runner(ids, pos, cache, 0)
    return ids, pos, cache


def step_with(runner, native_on: bool, state: tuple) -> torch.Tensor:
    ids, pos, cache = state
    runner.native_decode = native_on
    cache = type(cache)([k.clone() for k in cache.k], [v.clone() for v in cache.v])
    with torch.inference_mode():
        return runner(ids[:, -1:], pos[:, -1:] + 1, cache, 10).float()


@pytest.mark.parametrize("k", [64, 128, 192, 1088])  # groups: 1, 2, 3 (a pair and a single), 17 (past 16)
@pytest.mark.parametrize("rows", [1, 3])
def test_int4_product_is_exact_on_exactly_quantizable_activations(k: int, rows: int) -> None:
    """Activations whose per-group int8 quantization is exact (integers up to 127 times a power
    of two, with 127 in every group): the int4 product must then equal the dequantized fp32
    product up to summation order, whatever the group count."""
    torch.manual_seed(0)
    lin = nn.Linear(k, 40).to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, 4, group_size=64, int4_layout="plain")
    x = torch.randint(-127, 128, (rows, k)).float()
    x[:, ::64] = 127.0
    x *= 2.0 ** -7
    got = native.quant_matmul(q, x)
    assert got is not None
    want = x @ q.dequantize().float().t() + lin.bias.detach().float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def _generate_both(engine, monkeypatch, **kw) -> tuple[torch.Tensor, torch.Tensor, list]:
    """generate() with the native greedy loop, then with it disabled (Python's loop over native
    steps); and the token counts the native loop returned."""
    from flexspeed.inference.fused import FusedRunner

    made: list = []
    real = FusedRunner.greedy

    def spy(self, *a, **k):
        made.append(real(self, *a, **k))
        return made[-1]

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    with monkeypatch.context() as m:
        m.setattr(FusedRunner, "greedy", spy)
        fast = engine.generate(ids, attention_mask=mask, **kw)
    with monkeypatch.context() as m:
        m.setattr(FusedRunner, "greedy", lambda self, *a, **k: None)
        slow = engine.generate(ids, attention_mask=mask, **kw)
    return fast, slow, made


@pytest.mark.parametrize("name", ["opt", "gpt2", "llama"])
@pytest.mark.parametrize("dtype,bits", [("fp32", None), ("bf16", None), ("bf16", 4), ("fp32", 8)])
def test_native_greedy_loop_equals_the_python_loop(name: str, dtype: str, bits: int | None, monkeypatch) -> None:
    """The C loop (embedding lookups, rotary tables, argmax, left padding) gives the tokens of
    Python's loop over the same native steps, for every weight format."""
    engine = engine_for(name, dtype, bits)
    fast, slow, made = _generate_both(engine, monkeypatch, max_new_tokens=12)
    assert made == [12]
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("min_new", [0, 6])
def test_native_greedy_loop_eos_pad_and_min_new_tokens(min_new: int, monkeypatch) -> None:
    engine = engine_for("gpt2", "fp32", None)
    free, _, _ = _generate_both(engine, monkeypatch, max_new_tokens=12)
    eos = int(free[0, 7 + 3])  # row 0's fourth new token
    fast, slow, made = _generate_both(engine, monkeypatch, max_new_tokens=12, eos_token_id=eos, pad_token_id=V - 1,
                                      min_new_tokens=min_new)
    assert made and made[0] is not None
    assert fast.shape == slow.shape and torch.equal(fast, slow)
    assert bool((fast[:, 7:7 + min_new] != eos).all())
    if not min_new:  # row 0 stops at its fourth token; pads follow
        assert fast[0, 7 + 3] == eos and bool((fast[0, 7 + 4:] == V - 1).all())


def test_native_greedy_loop_steps_aside(monkeypatch) -> None:
    """Sampling, a repetition penalty and OPT's project_in keep Python's loop."""
    engine = engine_for("opt", "fp32", None)
    for kw in (dict(do_sample=True, generator=0), dict(repetition_penalty=1.3)):
        _, _, made = _generate_both(engine, monkeypatch, max_new_tokens=5, **kw)
        assert made == []
    post = engine_for("opt_postln", "fp32", None)  # project_in: the lookups are not plain tables
    runner = get_runner(post.module)
    assert runner.arch.tables is not None
    with pytest.raises(native.Unsupported, match="project_in"):
        runner.arch.tables(runner.root)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_own_worker_threads_match_openmp_and_survive_fork() -> None:
    """Under OMP_WAIT_POLICY=PASSIVE the kernel runs on its own spinning workers (fs_pool.h): the
    tokens equal those of OpenMP's threads, and a forked child (which has no workers) starts its
    own. (libgomp hangs in a forked child of a process that used it, so the OpenMP run does not
    fork, and the child keeps torch on one thread.)"""
    script = (
        "import json, os, sys, torch; sys.path.insert(0, %r)\n"
        "torch.set_num_threads(2)\n"
        "from test_native import engine_for\n"
        "e = engine_for('llama', 'bf16', 4)\n"
        "ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))\n"
        "out = {'parent': e.generate(ids, max_new_tokens=8).tolist()}\n"
        "if sys.argv[1] == 'openmp':\n"
        "    print(json.dumps(out)); sys.exit(0)\n"
        "r, w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:  # libgomp is not fork-safe: torch runs on one thread, the kernel on two\n"
        "    import faulthandler; faulthandler.dump_traceback_later(60, exit=True)  # never outlive the test\n"
        "    torch.set_num_threads(1); torch.get_num_threads = lambda: 2\n"
        "    os.write(w, json.dumps(e.generate(ids, max_new_tokens=8).tolist()).encode()); os._exit(0)\n"
        "os.close(w); data = b''\n"
        "while chunk := os.read(r, 65536): data += chunk\n"
        "os.waitpid(pid, 0); out['child'] = json.loads(data)\n"
        "print(json.dumps(out))\n" % os.path.dirname(__file__))
    results = {}
    for mode in ("pool", "openmp"):
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", FLEXSPEED_NATIVE_THREADS=mode)
        res = subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True,
                             timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
        results[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    assert results["pool"]["parent"] == results["pool"]["child"] == results["openmp"]["parent"]
