"""The decode path (native C kernel or torch) is chosen at run time, in one place
(:class:`~flexspeed.inference.runners.DecodePathChooser`): it measures both on the generation
itself, runs the faster, probes again every N steps or when the step time jumps, and can be pinned
(``decode_path``). Step times come from a fake clock here, so the tests decide the race and no test
depends on the machine's speed; the tokens must not depend on the path at all."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import flexspeed
from flexspeed.config.errors import ConfigError
from flexspeed.inference.native import library
from flexspeed.inference.runners import DecodePathChooser

tf = pytest.importorskip("transformers")
tf.utils.logging.set_verbosity_error()
V = 97
LOG = "flexspeed.inference.decode_path"


class Clock:
    """A fake time source: ``spend(seconds)`` moves it on."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


def steps(chooser: DecodePathChooser, clock: Clock, cost: dict[str, float], n: int, key: int = 1) -> list[str]:
    """Run ``n`` single steps through ``chooser``, each costing ``cost[path]``; the paths taken."""
    taken = []
    for _ in range(n):
        def on(path: str):
            return lambda: (taken.append(path), clock.spend(cost[path]))

        chooser.run(key, on("native"), on("torch"))
    return taken


def test_probe_alternates_then_runs_the_faster_path_both_ways() -> None:
    clock = Clock()
    c = DecodePathChooser(probe_steps=3, reprobe_every=1000, clear=10.0, clock=clock)
    assert steps(c, clock, {"native": 1.0, "torch": 2.0}, 8) == ["native", "torch"] * 3 + ["native"] * 2
    assert c.state(1).choice == "native" and c.state(1).measured == {"native": 1.0, "torch": 2.0}
    c2 = DecodePathChooser(probe_steps=3, reprobe_every=1000, clear=10.0, clock=clock)
    assert steps(c2, clock, {"native": 3.0, "torch": 2.0}, 8)[6:] == ["torch", "torch"]
    assert "batch 1: torch" in c2.describe() and "native 3000.00 ms, torch 2000.00 ms" in c2.describe()


def test_a_clear_winner_ends_the_probe_early() -> None:
    clock = Clock()
    c = DecodePathChooser(probe_steps=3, reprobe_every=1000, clear=2.0, clock=clock)
    assert steps(c, clock, {"native": 1.0, "torch": 2.5}, 4) == ["native", "torch", "native", "native"]
    assert c.state(1).measured == {"native": 1.0, "torch": 2.5}


def test_reprobe_after_n_steps_switches_when_the_race_changed(caplog) -> None:
    clock = Clock()
    c = DecodePathChooser(probe_steps=2, reprobe_every=5, jump=100.0, clear=10.0, clock=clock)
    with caplog.at_level(logging.DEBUG, logger=LOG):
        first = steps(c, clock, {"native": 1.0, "torch": 2.0}, 9)  # probe (4), 5 on native
        # torch got faster and native slower, but within ``jump``: only the step count notices
        later = steps(c, clock, {"native": 2.0, "torch": 1.0}, 7)
    assert first == ["native", "torch"] * 2 + ["native"] * 5
    assert later == ["native", "torch"] * 2 + ["torch"] * 3
    assert c.state(1).probes == 2
    text = caplog.text
    assert "probing again (5 steps since the last probe)" in text and "decode path for 1: torch (probe 2" in text


def test_step_time_jump_triggers_a_probe_up_and_down() -> None:
    clock = Clock()
    c = DecodePathChooser(probe_steps=1, reprobe_every=1000, jump=1.5, clock=clock)
    steps(c, clock, {"native": 1.0, "torch": 1.2}, 4)
    assert c.state(1).choice == "native" and c.state(1).probes == 1
    # native slows 4x (another process took its cores): the moving average passes 1.5x and torch's
    # probed time, a probe
    assert steps(c, clock, {"native": 4.0, "torch": 2.0}, 4) == ["native", "native", "torch", "torch"]
    assert c.state(1).choice == "torch" and "native step time moved 1.75x" in c.state(1).why  # .75 * 1 + .25 * 4
    # torch gets 3x faster (the load went away): after three steps the average is below 1 / 1.5, a
    # probe again, and native wins once more
    assert steps(c, clock, {"native": 0.5, "torch": 0.6}, 6) == ["torch"] * 3 + ["native", "torch", "native"]
    assert c.state(1).choice == "native" and "torch step time moved 0.60x" in c.state(1).why
    # native getting faster still (more load gone) is no reason to run torch again
    probes = c.state(1).probes
    assert set(steps(c, clock, {"native": 0.1, "torch": 0.6}, 6)) == {"native"} and c.state(1).probes == probes


def test_native_loop_runs_have_their_own_baseline() -> None:
    """A run of the greedy loop in C is faster per step than the probe's single steps (no Python
    between steps): that is no jump; a later run slower than the first by > ``jump`` is."""
    clock = Clock()
    c = DecodePathChooser(probe_steps=1, reprobe_every=1000, jump=1.5, clock=clock)
    steps(c, clock, {"native": 1.0, "torch": 1.4}, 2)
    c.record(1, "native", 0.3 * 30, steps=30)  # 0.3 a step against the probe's 1.0: the baseline
    c.record(1, "native", 0.4 * 30, steps=30)
    assert c.state(1).choice == "native" and c.state(1).probes == 1
    c.record(1, "native", 0.5 * 30, steps=30)  # 1.67x the first run: 1.67 a single step, above torch's 1.4
    assert c.state(1).choice is None and "native step time moved 1.67x" in c.state(1).why


def test_a_slowdown_that_cannot_change_the_choice_is_no_probe() -> None:
    """Under bursty load step times move all the time; a probe runs the slower path's steps, so the
    chosen path probes again on a jump only once it is slower than the other path was measured."""
    clock = Clock()
    c = DecodePathChooser(probe_steps=1, reprobe_every=1000, jump=1.5, clock=clock)
    steps(c, clock, {"native": 1.0, "torch": 3.0}, 2)
    assert set(steps(c, clock, {"native": 2.5, "torch": 3.0}, 20)) == {"native"}  # 2.5x, still below 3.0
    assert c.state(1).probes == 1
    assert steps(c, clock, {"native": 6.0, "torch": 3.0}, 4)[-1] == "torch"  # now above torch's 3.0: probed
    assert c.state(1).probes == 2


def test_chunks_of_steps_count_and_budget_the_native_loop() -> None:
    clock = Clock()
    c = DecodePathChooser(probe_steps=1, reprobe_every=10, clock=clock)
    assert c.native_budget(4) == 0  # probing: the next step is a single one
    steps(c, clock, {"native": 1.0, "torch": 2.0}, 2, key=4)
    assert c.native_budget(4) == 10
    c.record(4, "native", 6.0, steps=6)
    assert c.native_budget(4) == 4
    c.record(4, "native", 4.0, steps=4)  # 10 steps: probe again
    assert c.native_budget(4) == 0 and c.state(4).choice is None
    assert c.native_budget(1) == 0  # another batch size is measured on its own


def test_pinned_modes_never_probe_and_bad_modes_are_named() -> None:
    clock = Clock()
    for mode in ("native", "torch"):
        c = DecodePathChooser(mode, clock=clock)
        assert set(steps(c, clock, {"native": 5.0, "torch": 1.0} if mode == "native" else
                                {"native": 1.0, "torch": 5.0}, 6)) == {mode}
        assert c.native_budget(1) == (None if mode == "native" else 0)
        assert f"pinned to {mode}" in c.describe()
    with pytest.raises(ValueError, match="decode_path='fast'"):
        DecodePathChooser("fast")
    with pytest.raises(ConfigError, match="decode_path"):
        flexspeed.init_inference(torch.nn.Linear(2, 2), decode_path="fast")


def test_tensor_parallel_ranks_agree_and_ignore_their_own_jumps() -> None:
    clock = Clock()
    seen = []

    def agree(times):  # what the all-reduce (max over ranks) would give back
        seen.append(list(times))
        return [times[0], 0.5]

    c = DecodePathChooser(probe_steps=2, reprobe_every=1000, clock=clock, agree=agree)
    # a clear winner after one pair does not end the probe: every rank runs the same steps and
    # calls the collective at the same step, whatever its own times
    assert steps(c, clock, {"native": 1.0, "torch": 20.0}, 4) == ["native", "torch"] * 2
    assert seen == [[1.0, 20.0]] and c.state(1).choice == "torch"
    steps(c, clock, {"native": 1.0, "torch": 50.0}, 10)  # a rank's own jump: no probe (ranks would diverge)
    assert c.state(1).probes == 1 and c.state(1).choice == "torch"


# ------------------------------------------------------------------------- real generations


def opt() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, vocab_size=V,
                       max_position_embeddings=128, word_embed_proj_dim=64, init_std=0.2)
    return tf.OPTForCausalLM(cfg).eval()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


needs_native = pytest.mark.skipif(library() is None, reason="the native decode kernel is not built")


@needs_native
@pytest.mark.parametrize("inject", [True, False])
def test_tokens_are_the_same_whichever_path_runs(inject: bool, monkeypatch) -> None:
    """fp32 (the paths agree to ~1e-6 in the logits): pinned native, pinned torch, and auto whose
    fake clock makes it switch native -> torch -> native inside one generation, give the same tokens
    (and the same as HF's own generate); the auto run used both paths and the native greedy loop."""
    base = opt()
    ids, mask = prompts()
    kw = dict(max_new_tokens=40, min_new_tokens=40)
    out = {}
    for path in ("native", "torch"):
        e = flexspeed.init_inference(copy.deepcopy(base), dtype="fp32", replace_with_kernel_inject=inject,
                                     decode_path=path)
        out[path] = e.generate(ids, attention_mask=mask, **kw)
        assert f"pinned to {path}" in e.runner.describe() or path == "torch"
    e = flexspeed.init_inference(copy.deepcopy(base), dtype="fp32", replace_with_kernel_inject=inject)
    runner = e.runner
    clock = Clock()
    chooser = runner.paths
    chooser.clock, chooser.probe_steps, chooser.reprobe_every = clock, 1, 8
    cost = {"native": 1.0, "torch": 2.0}
    used = {"native": 0, "torch": 0, "loop": 0}
    torch_forward = runner._torch_forward
    native_forward = runner._native.forward
    native_greedy = runner._native.greedy

    def timed_torch(x, *a):
        used["torch"] += x.shape[1] == 1
        clock.spend(cost["torch"] if x.shape[1] == 1 else 0.0)
        return torch_forward(x, *a)

    def timed_native(*a):
        used["native"] += 1
        clock.spend(cost["native"])
        return native_forward(*a)

    def timed_loop(k, v, key_mask, seq, T, *a):
        made = native_greedy(k, v, key_mask, seq, T, *a)
        used["loop"] += 1
        clock.spend(cost["native"] * (made - 1))
        if used["loop"] == 1:  # after the first chunk native gets slow: the next probe picks torch
            cost["native"] = 3.0
        return made

    monkeypatch.setattr(runner, "_torch_forward", timed_torch)
    monkeypatch.setattr(runner._native, "forward", timed_native)
    monkeypatch.setattr(runner._native, "greedy", timed_loop)
    decisions = []
    real_decide = type(chooser)._decide

    def decide(self, key, st):
        real_decide(self, key, st)
        decisions.append(st.choice)
        if st.choice == "torch":
            cost["native"] = 1.0  # and then fast again: the step-count probe goes back to native

    monkeypatch.setattr(type(chooser), "_decide", decide)
    out["auto"] = e.generate(ids, attention_mask=mask, **kw)
    assert decisions[:3] == ["native", "torch", "native"], decisions
    assert used["torch"] > 0 and used["native"] > 0 and used["loop"] >= 2
    assert torch.equal(out["native"], out["torch"]) and torch.equal(out["auto"], out["torch"])
    hf = base.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=1, **kw)
    assert torch.equal(out["torch"], hf)


@needs_native
def test_chunked_native_loop_stops_at_eos_like_the_whole_loop() -> None:
    """eos / pad / min_new_tokens across chunk boundaries: the same tokens as one whole C loop."""
    base = opt()
    ids, mask = prompts()
    outs = []
    for every in (None, 3):
        e = flexspeed.init_inference(copy.deepcopy(base), dtype="fp32", replace_with_kernel_inject=True,
                                     decode_path="native" if every is None else "auto")
        if every is not None:
            e.runner.paths.reprobe_every, e.runner.paths.probe_steps = every, 1
        full = e.generate(ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=0)
        eos = int(full[0, 14])  # a token row 0 makes: it finishes there
        outs.append([e.generate(ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=m, eos_token_id=eos,
                                pad_token_id=0) for m in (0, 6)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@needs_native
def test_bare_generate_calls_on_an_unfused_model_share_their_measurements() -> None:
    """generate(model, ...) on an un-injected model builds its shadow runner per call; the decode
    path chooser is the model's across calls (a weak table, nothing on the model), so only the
    first call probes; an engine keeps its own."""
    from flexspeed.inference.generation import generate
    from flexspeed.inference.runners import select_runner

    model = opt()
    before = set(vars(model))
    ids, mask = prompts()
    first = select_runner(model).runner
    generate(model, ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12)
    again = select_runner(model).runner
    assert again is not first and again.paths is first.paths and set(vars(model)) == before
    state = again.paths.state(2)
    assert state.choice is not None and state.probes == 1
    taken = len(state.samples["native"]) + len(state.samples["torch"])
    generate(model, ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12)
    assert state.probes == 1 and len(state.samples["native"]) + len(state.samples["torch"]) == taken
    engine = flexspeed.init_inference(model, dtype="fp32")
    assert engine.runner.paths is not first.paths
    assert select_runner(copy.deepcopy(model)).runner.paths is not first.paths
