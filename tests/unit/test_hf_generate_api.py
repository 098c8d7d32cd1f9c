"""HF ``generate``'s API on flexspeed: every argument class either runs in flexspeed's loop or in
HF's own loop over flexspeed's runner, with HF's outputs (fp32; greedy and beams token for token,
sampling under the same ``torch.manual_seed``). Each check runs the un-injected model (its
shadow/HF-cache runner), the kernel-injected model, and ``init_inference``'s engine."""

from __future__ import annotations

import copy

import pytest
import torch

import flexspeed
from flexspeed.inference.generation import generate
from flexspeed.inference.kernels import inject_kernels

from ._families import build, padded_batch

tf = pytest.importorskip("transformers")
tf.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module", params=["opt", "llama"])
def models(request):
    model = build(request.param)
    injected = inject_kernels(copy.deepcopy(model))
    engine = flexspeed.init_inference(copy.deepcopy(model), dtype=torch.float32, replace_with_kernel_inject=True)
    return model, {"plain": lambda *a, **k: generate(model, *a, **k),
                   "injected": lambda *a, **k: generate(injected, *a, **k),
                   "engine": engine.generate}


def _same(a, b) -> None:
    if isinstance(b, torch.Tensor):
        assert torch.equal(a, b), (a, b)
        return
    assert torch.equal(a.sequences, b.sequences)
    for name in ("scores", "logits"):
        if getattr(b, name, None) is not None:
            assert len(getattr(a, name)) == len(getattr(b, name))
            for x, y in zip(getattr(a, name), getattr(b, name)):
                finite = torch.isfinite(y)
                assert torch.equal(finite, torch.isfinite(x))
                torch.testing.assert_close(x[finite], y[finite], rtol=0, atol=1e-4)
    if getattr(b, "sequences_scores", None) is not None:
        torch.testing.assert_close(a.sequences_scores, b.sequences_scores, rtol=0, atol=1e-4)


def _check(models, seed: int | None = None, ids=None, mask=None, **kw) -> None:
    model, ours = models
    if ids is None:
        ids, mask = padded_batch()
    kw.setdefault("max_new_tokens", 8)
    if seed is not None:
        torch.manual_seed(seed)
    ref = model.generate(ids, attention_mask=mask, **kw)
    for name, fn in ours.items():
        if seed is not None:
            torch.manual_seed(seed)
        _same(fn(ids, attention_mask=mask, **kw), ref)


def test_greedy(models) -> None:
    _check(models, do_sample=False)


def test_seeded_sampling_with_filters(models) -> None:
    _check(models, seed=3, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    _check(models, seed=4, do_sample=True, num_return_sequences=2)  # top_k=50 by HF's default


@pytest.mark.parametrize("name", ["opt", "gpt2", "gpt_neox"])
def test_nothing_but_sampling_draws_from_the_global_rng(name: str) -> None:
    """Injection (fused and converted projections), init_inference and the first prompt of the
    process (it probes oneDNN's packed product once) draw nothing from the user's global RNG, so a
    seeded ``generate`` samples what HF's does even as the process's first call. Seen: the probe's
    two ``torch.randn`` calls shifted every sample of the first sampled generate."""
    from flexspeed.inference import packed

    packed._packing_works.cache_clear()  # as in a fresh process
    model = build(name)
    ids, mask = padded_batch()
    ids, mask = ids.repeat(3, 1), mask.repeat(3, 1)  # 9 rows: the prompt takes the packed product
    state = torch.get_rng_state()
    injected = inject_kernels(copy.deepcopy(model))
    engine = flexspeed.init_inference(copy.deepcopy(model), dtype=torch.float32, replace_with_kernel_inject=True)
    for fn in (lambda *a, **k: generate(model, *a, **k), lambda *a, **k: generate(injected, *a, **k),
               engine.generate):
        fn(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert torch.equal(state, torch.get_rng_state())


def test_generation_config_defaults_are_honoured(models) -> None:
    model, ours = models
    gc = tf.GenerationConfig(do_sample=True, temperature=0.7, top_k=10, max_new_tokens=6, pad_token_id=0,
                             eos_token_id=2)
    _check(models, seed=5, generation_config=gc)
    saved = model.generation_config
    try:  # the model's own generation_config (do_sample=True there) is the default of every call
        model.generation_config = copy.deepcopy(gc)
        ids, mask = padded_batch()
        torch.manual_seed(6)
        ref = model.generate(ids, attention_mask=mask)
        torch.manual_seed(6)
        assert torch.equal(generate(model, ids, attention_mask=mask), ref)
    finally:
        model.generation_config = saved


def test_beam_search(models) -> None:
    _check(models, num_beams=3)
    _check(models, num_beams=4, num_return_sequences=2, length_penalty=0.5, early_stopping=True)


def test_return_dict_and_scores(models) -> None:
    _check(models, return_dict_in_generate=True, output_scores=True, output_logits=True)
    _check(models, num_beams=2, return_dict_in_generate=True, output_scores=True)


def test_processor_arguments(models) -> None:
    _check(models, no_repeat_ngram_size=2)
    _check(models, seed=7, do_sample=True, min_p=0.1)
    _check(models, bad_words_ids=[[5], [7, 8]], min_length=12)


def test_custom_logits_processor_and_stopping_criteria(models) -> None:
    class Ban(tf.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.index_fill(1, torch.tensor([10, 11, 12]), float("-inf"))

    class StopAfter(tf.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids.shape[1] >= 13 + (input_ids[:, -1] % 2 == 0).long()  # per-row decision

    _check(models, logits_processor=tf.LogitsProcessorList([Ban()]))
    _check(models, stopping_criteria=tf.StoppingCriteriaList([StopAfter()]), max_new_tokens=10)


class Collect(tf.generation.BaseStreamer if hasattr(tf, "generation") else object):
    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.parts.append(value.clone())

    def end(self) -> None:
        self.ended = True


@pytest.mark.parametrize("extra", [{}, {"no_repeat_ngram_size": 2}, {"do_sample": True}])
def test_streamer_sees_what_hf_streams(models, extra) -> None:
    model, ours = models
    ids, mask = padded_batch()
    ids, mask = ids[:1], mask[:1]  # HF's streamers take one row
    want = Collect()
    torch.manual_seed(8)
    model.generate(ids, attention_mask=mask, max_new_tokens=6, streamer=want, **extra)
    for name, fn in ours.items():
        got = Collect()
        torch.manual_seed(8)
        fn(ids, attention_mask=mask, max_new_tokens=6, streamer=got, **extra)
        assert got.ended and len(got.parts) == len(want.parts), name
        assert all(torch.equal(a.reshape(-1), b.reshape(-1)) for a, b in zip(got.parts, want.parts)), name


def test_streamer_with_beams_is_refused_as_hf_refuses_it(models) -> None:
    model, ours = models
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="streamer"):
        ours["engine"](ids[:1], attention_mask=mask[:1], max_new_tokens=4, num_beams=2, streamer=Collect())


def test_api_benchmark_quick_smoke(capsys: pytest.CaptureFixture) -> None:
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "generate_api.py"
    spec = importlib.util.spec_from_file_location("bench_generate_api", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--dtype", "fp32"])
    assert {r["case"] for r in rows} == set(bench.CASES) and all(r["fs_tok_s"] > 0 for r in rows)
    assert "fs/HF" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [{}, {"seed": 9, "do_sample": True}])
def test_assistant_model_drafts_are_cropped_and_outputs_equal_hf(models, extra, monkeypatch) -> None:
    """Assisted (speculative) decoding: HF's loop verifies the assistant's draft tokens in one
    step of flexspeed's runner and crops the rejected ones (a perturbed assistant: some drafts
    are rejected, so ``RunnerCache.crop`` really moves the cache back)."""
    from flexspeed.inference.hf_generate import RunnerCache

    model, _ = models
    assistant = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in assistant.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    crops: list[int] = []
    real = RunnerCache.crop
    monkeypatch.setattr(RunnerCache, "crop", lambda self, n: (crops.append(n), real(self, n))[1])
    ids, mask = padded_batch()
    # HF's assisted loop takes one row; assistant_model is passed through to it
    _check(models, assistant_model=assistant, **{**{"max_new_tokens": 12, "do_sample": False}, **extra},
           ids=ids[:1], mask=mask[:1])
    assert crops and any(n < 0 for n in crops), crops  # drafts were rejected and dropped


def test_crop_semantics() -> None:
    class Runner:
        pass

    from flexspeed.inference.hf_generate import RunnerCache

    cache = RunnerCache(Runner(), 16)
    cache.seen = 10
    cache.crop(-3)
    assert cache.get_seq_length() == 7
    cache.crop(5)
    assert cache.get_seq_length() == 5
    cache.crop(9)  # longer than held: unchanged, as DynamicCache.crop
    assert cache.get_seq_length() == 5
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(-6)
