"""The serving engine without HTTP: continuous batching gives every request HF's greedy tokens whatever else
runs (rows joining and leaving between steps, the busy columns moved both ways), static batching for other
families and offloaded models, per-request sampling, stop strings and incremental text, the queue bound,
cancellation, a failing step, metrics."""

from __future__ import annotations

import copy
import queue
import random
from collections import deque

import pytest
import torch

from tests.unit._textmodels import Reference, make_folder, save_model

tf = pytest.importorskip("transformers")

from flexspeed.inference.kernels import get_runner, inject_kernels  # noqa: E402
from flexspeed.serve import Completion, Engine, EngineOptions, QueueFull, RequestError, SamplingParams  # noqa: E402
from flexspeed.serve.batching import SlotBatcher, WaveBatcher  # noqa: E402
from flexspeed.serve.model import load_text_model  # noqa: E402
from flexspeed.serve.sampling import sample_rows  # noqa: E402
from flexspeed.serve.sequence import Sequence  # noqa: E402
from flexspeed.serve.tokenizer import TextStream, load_tokenizer  # noqa: E402

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return make_folder(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.fixture(scope="module")
def ref(llama) -> Reference:
    return Reference(llama)


class _Tok:
    """Decodes ids as space-separated numbers (the batcher tests need no real tokenizer)."""

    eos_token_id = None

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def _drive(batcher, reqs: list[tuple[list[int], int, int]], hooks: dict | None = None) -> dict[int, list[int]]:
    """Run requests (prompt, max_tokens, arrival step) through a batcher step by step, greedily."""
    pending, waiting, outs, step = sorted(enumerate(reqs), key=lambda p: p[1][2]), deque(), {}, 0
    with torch.inference_mode():
        while pending or waiting or batcher.running():
            while pending and pending[0][1][2] <= step:
                i, (prompt, m, _) = pending.pop(0)
                seq = Sequence(prompt, SamplingParams(max_tokens=m, **GREEDY), _Tok(), lambda o: None)
                seq.index = i
                waiting.append(seq)
            batcher.admit(waiting)
            seqs, logits = batcher.forward()
            step += 1
            for seq, tok in zip(seqs, sample_rows(logits, seqs, [])):
                seq.append(tok, [])
                if seq.finished:
                    outs[seq.index] = seq.output_ids
                    batcher.release(seq)
            assert step < 2000
    return outs


def _hf_tokens(model, prompt: list[int], max_new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family,native,full", [("llama", True, False), ("llama", False, False), ("opt", True, False),
                                               ("gpt2", False, False), ("llama", False, True)])
def test_continuous_batching_gives_each_request_hf_greedy_tokens(tmp_path, family: str, native: bool,
                                                                  full: bool) -> None:
    save_model(str(tmp_path), family, vocab=97, positions=128)
    model = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    runner = get_runner(inject_kernels(copy.deepcopy(model)))
    runner.native_decode = native
    batcher = SlotBatcher(runner, slots=3, cache_len=48)
    batcher.full_batch = full  # every slot every step, as on an accelerator (idle rows included)
    shifts: list[int] = []
    move = batcher._move
    batcher._move = lambda shift: (shifts.append(shift), move(shift))[1]
    rng = random.Random(1)
    # a short request, then a long prompt joins while it runs (the busy columns move right), then prompts of
    # 1-25 tokens for 1-22 new tokens arrive over 40 steps: rows join and leave mid-run, the cache end is reached
    reqs = [([7, 8], 20, 0), ([5] * 30, 10, 2)]
    reqs += [([rng.randrange(3, 97) for _ in range(rng.randint(1, 25))], rng.randint(1, 22), rng.randint(3, 40))
             for _ in range(12)]
    # later, alone: row 0 idles for many steps under a long row 1, then a one-token prompt takes it
    reqs += [([9, 10], 3, 400), ([11, 12, 13], 30, 400), ([14], 5, 415)]
    outs = _drive(batcher, reqs)
    for i, (prompt, m, _) in enumerate(reqs):
        assert outs[i] == _hf_tokens(model, prompt, m), f"request {i}"
    assert any(s < 0 for s in shifts) and any(s > 0 for s in shifts), shifts  # both moves were exercised


def test_slot_rows_are_freed_and_reused(tmp_path) -> None:
    save_model(str(tmp_path), "llama", vocab=97, positions=128)
    model = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    batcher = SlotBatcher(get_runner(inject_kernels(copy.deepcopy(model))), slots=2, cache_len=64)
    seqs = [Sequence([3 + i, 4, 5], SamplingParams(max_tokens=50, **GREEDY), _Tok(), lambda o: None) for i in range(3)]
    waiting = deque(seqs)
    batcher.admit(waiting)
    assert batcher.running() == 2 and list(waiting) == [seqs[2]]
    batcher.release(seqs[0])  # cancelled before its prefill
    batcher.admit(waiting)
    assert batcher.rows == [seqs[2], seqs[1]] and not waiting


def test_static_batching_for_a_family_without_fused_kernels(tmp_path) -> None:
    folder = make_folder(str(tmp_path), "bloom")  # outside the family registry
    ref = Reference(folder)
    model = load_text_model(folder)
    assert model.fused_runner is None
    engine = Engine(model, load_tokenizer(folder), EngineOptions(max_num_seqs=3)).start()
    try:
        assert isinstance(engine.batcher, WaveBatcher) and "no fused kernels" in engine.describe()
        prompts = ["Kalo mi ne ruta", "Us", "Vide po an el or kasomi", "Ta ta"]
        done = _run(engine, [(ref.ids(p), SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(prompts, (9, 14, 3, 7))])
        for p, n, c in zip(prompts, (9, 14, 3, 7), done):
            assert c.text == ref.text(p, n)
        assert engine.batcher.waves == 2  # three, then the fourth
    finally:
        engine.close()


def test_offloaded_model_is_served_by_static_batching(tmp_path) -> None:
    from flexspeed.inference.offload.policy import OffloadPolicy

    folder = make_folder(str(tmp_path), "opt")
    ref = Reference(folder)
    policy = OffloadPolicy.from_percent([30, 20, 50, 50, 100, 0], gpu_batch_size=2, num_gpu_batches=1,
                                        offload_dir=str(tmp_path / "off"))
    model = load_text_model(folder, dtype="fp32", offload=policy)
    engine = Engine(model, load_tokenizer(folder), EngineOptions(max_num_seqs=2)).start()
    try:
        prompts = ["Kalo mi ne ruta so", "Us", "Vide po an"]
        done = _run(engine, [(ref.ids(p), SamplingParams(max_tokens=8, **GREEDY)) for p in prompts])
        assert [c.text for c in done] == [ref.text(p, 8) for p in prompts]
    finally:
        engine.close()
        model.engine.offload.close()


def _run(engine: Engine, reqs: list[tuple[list[int], SamplingParams]], timeout: float = 120) -> list[Completion]:
    got: queue.Queue = queue.Queue()
    done = [Completion() for _ in reqs]
    for i, (ids, params) in enumerate(reqs):
        engine.submit(ids, params, lambda o, i=i: got.put((i, o)))
    left = len(reqs)
    while left:
        i, out = got.get(timeout=timeout)
        done[i].add(out)
        left -= out.finish_reason is not None
    return done


@pytest.fixture(scope="module")
def engine(llama):
    eng = Engine(load_text_model(llama), load_tokenizer(llama), EngineOptions(max_num_seqs=4, max_queue=64)).start()
    yield eng
    eng.close()


def test_engine_greedy_text_equals_hf_with_sampled_rows_alongside(engine, ref) -> None:
    prompts = ["Kalo mi ne", "Ruta so vi de po an el ka lo mi", "Us", "Tavi mika or!", "De po"]
    reqs = [(ref.ids(p), SamplingParams(max_tokens=6 + 3 * i, **GREEDY)) for i, p in enumerate(prompts)]
    noise = [(ref.ids("Kalo"), SamplingParams(max_tokens=20, temperature=1.3, top_p=0.9, top_k=20, seed=s))
             for s in range(3)]
    done = _run(engine, reqs + noise)
    for (ids, params), c in zip(reqs, done):
        text, new = ref.greedy(ids, params.max_tokens)
        assert c.text == text and c.completion_tokens == len(new)
        assert c.finish_reason == ("stop" if new[-1] == 1 else "length")
    assert sum(engine.metrics.finished.values()) >= len(reqs) + len(noise)


def test_complete_runs_prompts_to_their_end(engine, ref) -> None:
    outs = engine.complete([ref.ids(p) for p in ("Kalo", "Ruta so vi")], SamplingParams(max_tokens=7, **GREEDY),
                           timeout=60)
    assert [c.text for c in outs] == [ref.text("Kalo", 7), ref.text("Ruta so vi", 7)]
    with pytest.raises(TimeoutError, match="1 of 1 requests were not done within 0 s"):
        engine.complete([ref.ids("Kalo")], SamplingParams(max_tokens=200, ignore_eos=True, **GREEDY), timeout=0)


def test_seeded_sampling_is_reproducible_and_filters_apply(engine, ref) -> None:
    ids = ref.ids("Kalo mi ne")
    params = [SamplingParams(max_tokens=12, temperature=1.5, seed=7), SamplingParams(max_tokens=12, temperature=1.5, seed=7),
              SamplingParams(max_tokens=12, temperature=1.5, seed=8), SamplingParams(max_tokens=12, temperature=0.7, top_k=1, seed=3)]
    a, b, c, k1 = _run(engine, [(ids, p) for p in params])
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert k1.text == ref.text("Kalo mi ne", 12)  # top_k=1 is greedy


def test_processors_min_tokens_bias_stop_ids_and_penalties(engine, ref) -> None:
    ids = ref.ids("Ruta so")
    eos = 1
    forced, = _run(engine, [(ids, SamplingParams(max_tokens=5, logit_bias=((eos, 100.0),), **GREEDY))])
    assert forced.token_ids == [eos] and forced.finish_reason == "stop" and forced.text == ""
    held, = _run(engine, [(ids, SamplingParams(max_tokens=5, min_tokens=3, logit_bias=((eos, 100.0),), **GREEDY))])
    assert held.token_ids[3] == eos and eos not in held.token_ids[:3] and held.completion_tokens == 4
    plain = ref.greedy(ids, 8)[1]
    stopped, = _run(engine, [(ids, SamplingParams(max_tokens=8, stop_token_ids=(plain[2],), **GREEDY))])
    assert stopped.token_ids == plain[:3] and stopped.finish_reason == "stop"
    assert stopped.text == ref.tok.decode(plain[:2], skip_special_tokens=True)  # the stop token's text is left out
    repeat, = _run(engine, [(ids, SamplingParams(max_tokens=20, ignore_eos=True, **GREEDY))])
    fresh, = _run(engine, [(ids, SamplingParams(max_tokens=20, ignore_eos=True, presence_penalty=2.0,
                                                 frequency_penalty=2.0, **GREEDY))])
    assert len(set(fresh.token_ids)) > len(set(repeat.token_ids))  # penalties push toward unseen tokens


def test_stop_strings_and_max_tokens(engine, ref) -> None:
    ids = ref.ids("Kalo mi ne")
    full = ref.text("Kalo mi ne", 30)
    stop = full[5:8]
    c, = _run(engine, [(ids, SamplingParams(max_tokens=30, stop=(stop, "never-there"), **GREEDY))])
    assert c.text == full[:full.index(stop)] and c.finish_reason == "stop"
    c, = _run(engine, [(ids, SamplingParams(max_tokens=3, **GREEDY))])
    assert c.completion_tokens == 3 and c.finish_reason == "length"


def test_text_stream_holds_back_partial_stops_and_characters() -> None:
    class Chars:
        def decode(self, ids: list[int]) -> str:
            return "".join(chr(i) for i in ids)

    def ids(text: str) -> list[int]:
        return [ord(c) for c in text]

    s = TextStream(Chars(), stop=("END",))  # "EN" could begin "END": the last 2 characters wait
    assert [s.push(ids("abcEND"[:n]), final=False) for n in range(1, 7)] == ["", "", "a", "b", "c", ""]
    assert s.stopped and s.text == "abc" and s.push(ids("abcENDmore"), final=True) == ""
    two = TextStream(Chars(), stop=("END", "Q"))
    assert two.push(ids("xyzQ"), final=False) == "xyz" and two.stopped  # the earliest stop wins
    assert TextStream(Chars(), stop=("END",)).push(ids("abEN"), final=True) == "abEN"  # the end flushes
    u = TextStream(Chars())
    assert u.push([ord("a"), 0xFFFD], final=False) == "a"  # an incomplete character is held back
    assert u.push([ord("a"), 0xFFFD], final=True) == "\ufffd"


def test_queue_bound_cancellation_and_limits(llama, ref) -> None:
    eng = Engine(load_text_model(llama), load_tokenizer(llama), EngineOptions(max_num_seqs=1, max_queue=2))
    ids, got = ref.ids("Kalo"), queue.Queue()
    first = eng.submit(ids, SamplingParams(max_tokens=5, **GREEDY), got.put)
    second = eng.submit(ids, SamplingParams(max_tokens=5, **GREEDY), got.put)
    with pytest.raises(QueueFull) as e:  # not started: both wait, the queue is full
        eng.submit(ids, SamplingParams(max_tokens=5, **GREEDY), got.put)
    assert e.value.status == 429 and "max_queue=2" in str(e.value)
    second.cancel()
    eng.start()
    outs = [got.get(timeout=60) for _ in range(6)]
    assert [o.finish_reason for o in outs].count("abort") == 1 and outs[-1].finish_reason == "length"
    assert first.finished and second.finish_reason == "abort"
    with pytest.raises(RequestError, match="maximum context length is 256 tokens.*250 in the prompt"):
        eng.submit([5] * 250, SamplingParams(max_tokens=10), got.put)
    with pytest.raises(RequestError, match=r"outside the vocabulary \[0, 384\)"):
        eng.submit([5, 999], SamplingParams(max_tokens=1), got.put)
    with pytest.raises(RequestError, match="prompt is empty"):
        eng.submit([], SamplingParams(max_tokens=1), got.put)
    with pytest.raises(RequestError, match="top_p=0 must be in"):
        SamplingParams(top_p=0)
    eng.close()
    with pytest.raises(RequestError, match="not running") as e:
        eng.submit(ids, SamplingParams(max_tokens=1), got.put)
    assert e.value.status == 503


def test_a_failing_step_ends_its_requests_and_the_engine_goes_on(llama, ref, monkeypatch) -> None:
    eng = Engine(load_text_model(llama), load_tokenizer(llama), EngineOptions(max_num_seqs=2)).start()
    try:
        real, calls = eng.batcher.forward, []

        def flaky():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("boom")
            return real()

        monkeypatch.setattr(eng.batcher, "forward", flaky)
        c, = _run(eng, [(ref.ids("Kalo"), SamplingParams(max_tokens=5, **GREEDY))])
        assert c.finish_reason == "error" and "boom" in c.error
        c, = _run(eng, [(ref.ids("Kalo"), SamplingParams(max_tokens=5, **GREEDY))])
        assert c.text == ref.text("Kalo", 5) and eng.alive
    finally:
        eng.close()


def test_metrics_render_prometheus_text(engine, ref) -> None:
    _run(engine, [(ref.ids("Us"), SamplingParams(max_tokens=4, **GREEDY))])
    text = engine.metrics.render()
    lines = text.splitlines()
    for name, kind in [("flexspeed_num_requests_running", "gauge"), ("flexspeed_num_requests_waiting", "gauge"),
                       ("flexspeed_generation_tokens_per_second", "gauge"),
                       ("flexspeed_time_to_first_token_seconds", "histogram"),
                       ("flexspeed_e2e_request_latency_seconds", "histogram")]:
        assert f"# TYPE {name} {kind}" in lines
    counts = [int(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith("flexspeed_time_to_first_token_seconds_bucket")]
    assert counts == sorted(counts) and counts[-1] >= 1  # cumulative buckets, +Inf last
    assert any(ln.startswith('flexspeed_requests_finished_total{finish_reason="length"}') for ln in lines), text
    for ln in lines:  # every sample line is NAME{labels} VALUE
        if not ln.startswith("#"):
            float(ln.rsplit(" ", 1)[1])


def test_a_finish_is_counted_before_its_last_output_goes_out(engine, ref) -> None:
    """Whoever receives a request's last output (the HTTP handler, a test) finds it in the metrics:
    the engine counts the finish before the output leaves. Seen: the metrics test, run as the
    engine's first request, rendered no finished request at all."""
    before = engine.metrics.finished.get("length", 0)
    counted: queue.Queue = queue.Queue()
    engine.submit(ref.ids("Us"), SamplingParams(max_tokens=2, **GREEDY),
                  lambda out: out.finish_reason and counted.put(engine.metrics.finished.get(out.finish_reason, 0)))
    assert counted.get(timeout=120) == before + 1


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_incremental_text_equals_decoding_everything(tmp_path, kind: str) -> None:
    """Random token streams (invalid UTF-8 pieces included): the deltas add up to ``decode(all)`` at every end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.unit._textmodels import sentences
    from flexspeed.serve.tokenizer import TextTokenizer

    tok = Tokenizer(models.BPE())
    if kind == "byte-level":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece's convention: "▁" marks a word start, the decoder drops the first one
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    tok.train_from_iterator(sentences(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                             initial_alphabet=alphabet))
    hf = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    text_tok = TextTokenizer(hf, str(tmp_path))
    rng = random.Random(0)
    for trial in range(30):
        ids = [rng.randrange(hf.vocab_size) for _ in range(rng.randint(1, 40))]
        stream = TextStream(text_tok)
        pieces = [stream.push(ids[:n], final=n == len(ids)) for n in range(1, len(ids) + 1)]
        assert "".join(pieces) == stream.text == hf.decode(ids, skip_special_tokens=True), (trial, ids)
