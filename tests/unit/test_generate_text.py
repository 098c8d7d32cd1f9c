"""``flexspeed generate --prompts FILE.jsonl --output OUT.jsonl``: every completion equals HF ``generate`` + decode
(greedy), in memory and offloaded; bad lines become error records naming the line and the rest runs; a killed
run resumes with every id written once; bad folders and options fail with one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.unit._textmodels import Reference, make_folder

pytest.importorskip("transformers")

from flexspeed.cli.main import main  # noqa: E402

PROMPTS = ["Kalo mi ne", "Ruta so vi de po an el ka lo mi tavi", "Us", "Tavi mika or! Deso", "De po", "Anelor kaso vi"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return make_folder(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.fixture(scope="module")
def ref(llama) -> Reference:
    return Reference(llama)


def write_jsonl(path, rows: list) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_completions_equal_hf_generate_and_decode(llama, ref, tmp_path, capsys) -> None:
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    rows[2]["max_new_tokens"] = 4
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Kalo mi?"}]
    rows.append({"id": 99, "messages": chat})
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", llama, "--prompts", write_jsonl(tmp_path / "p.jsonl", rows), "--output",
               str(out), "--max-new-tokens", "12", "--max-num-seqs", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "wrote 7 records to" in captured.out and "(7 completions, 0 errors;" in captured.out and "tok/s" in captured.err  # summary, progress bar
    got = {r["id"]: r for r in records(out)}
    assert set(got) == {f"p{i}" for i in range(len(PROMPTS))} | {99}
    for i, p in enumerate(PROMPTS):
        text, new = ref.greedy(ref.ids(p), 4 if i == 2 else 12)
        assert got[f"p{i}"] == {"id": f"p{i}", "text": text, "prompt_tokens": len(ref.ids(p)),
                                "completion_tokens": len(new), "finish_reason": "stop" if new[-1] == 1 else "length"}
    assert got[99]["text"] == ref.greedy(ref.chat_ids(chat), 12)[0]


def test_bad_lines_are_recorded_and_the_rest_runs(llama, ref, tmp_path, capsys) -> None:
    rows = ['{"id": "a", "prompt": "Kalo mi ne"}', "not json at all", '{"id": "b", "promt": "x"}',
            '{"id": "c", "prompt": 5}', '{"id": "d", "prompt": "Us", "max_new_tokens": 5000}', "",
            '{"id": "a", "prompt": "again"}', '["a list"]', '{"prompt": "Us", "top_p": 7}',
            '{"id": "e", "prompt": "x", "messages": []}', '{"prompt": "De po"}']
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", llama, "--prompts", write_jsonl(tmp_path / "p.jsonl", rows), "--output", str(out),
            "--max-new-tokens", "6"]
    assert main(args) == 0
    got = {r["id"]: r for r in records(out)}
    errors = {k: r["error"] for k, r in got.items() if "error" in r}
    assert errors[2] == "line 2: not valid JSON (Expecting value at column 1)"
    assert errors["b"].startswith("line 3: unknown field 'promt'. Did you mean 'prompt'?")
    assert errors["c"] == "line 4: field 'prompt' must be a string, got int"
    assert errors["d"].startswith("line 5: This model's maximum context length is 256 tokens")
    assert errors["line 7"] == "line 7: id 'a' is already used on line 1"
    assert errors[8] == "line 8: expected a JSON object, got list"
    assert errors[9].startswith("line 9: top_p=7.0 must be in (0, 1]")
    assert errors["e"] == "line 10: give exactly one of 'prompt' (text) or 'messages' (a chat)"
    assert got["a"]["text"] == ref.text("Kalo mi ne", 6) and got[11]["text"] == ref.text("De po", 6)
    assert len(got) == len(records(out)) == 10  # every line once (the blank one is no line)
    assert main(args) == 0  # a rerun finds every id done
    assert len(records(out)) == 10 and "nothing to do: all 10 ids" in capsys.readouterr().out


def test_a_killed_run_resumes_with_every_id_once(llama, tmp_path) -> None:
    n = 150
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": PROMPTS[i % len(PROMPTS)] + " ka" * (i % 7)}
                                                  for i in range(n)])
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", llama, "--prompts", prompts, "--output", str(out), "--max-new-tokens", "40"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "flexspeed", *args, "--max-num-seqs", "2", "--threads", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text().count("\n") >= 3):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no output within 120 s"
            time.sleep(0.01)
        assert proc.poll() is None  # killed mid-way
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    first = records(out)
    assert 3 <= len(first) < n
    assert main(args) == 0
    ids = [r["id"] for r in records(out)]
    assert sorted(ids) == list(range(n)) and all("text" in r for r in records(out))
    assert records(out)[:len(first)] == first  # append-only


def test_a_record_cut_short_is_made_again(llama, tmp_path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:3])])
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", llama, "--prompts", prompts, "--output", str(out), "--max-new-tokens", "4"]
    assert main(args) == 0
    whole = out.read_text().splitlines()
    out.write_text("\n".join(whole[:2]) + "\n" + whole[2][:10])  # a kill during the last write
    assert main(args) == 0
    again = records(out)
    assert sorted(r["id"] for r in again) == [0, 1, 2] and again[2] == json.loads(whole[2])


def test_offloaded_generation_equals_hf(tmp_path) -> None:
    folder = make_folder(str(tmp_path / "opt"), "opt")
    ref = Reference(folder)
    out = tmp_path / "out.jsonl"
    rows = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)]
    rc = main(["generate", "--model", folder, "--prompts", write_jsonl(tmp_path / "p.jsonl", rows), "--output",
               str(out), "--max-new-tokens", "8", "--percent", "50", "50", "0", "100", "100", "0", "--gpu-batch-size",
               "2", "--num-gpu-batches", "2", "--offload-dir", str(tmp_path / "off"), "--dtype", "fp32"])
    assert rc == 0
    got = {r["id"]: r["text"] for r in records(out)}
    assert got == {i: ref.text(p, 8) for i, p in enumerate(PROMPTS)}


def test_mem_budget_chooses_a_policy_for_the_prompts(llama, ref, tmp_path, monkeypatch, capsys) -> None:
    import flexspeed.inference.offload.chooser as chooser
    from flexspeed.inference.offload.chooser import MachineProfile

    profile = MachineProfile(mem_read_bw=25e9, mem_copy_bw=20e9, disk_cold_bw=1e9, disk_warm_bw=6e9, matmul_flops=6e11)
    monkeypatch.setattr(chooser, "probe_machine", lambda *a, **k: profile)
    out = tmp_path / "out.jsonl"
    rows = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:4])]
    rc = main(["generate", "--model", llama, "--prompts", write_jsonl(tmp_path / "p.jsonl", rows), "--output",
               str(out), "--max-new-tokens", "6", "--mem-budget", "64MB", "--max-batch", "4",
               "--offload-dir", str(tmp_path / "off")])
    printed = capsys.readouterr().out
    assert rc == 0 and "policy (chosen for 64MB: estimated" in printed and "offloaded" in printed
    assert {r["id"]: r["text"] for r in records(out)} == {i: ref.text(p, 6) for i, p in enumerate(PROMPTS[:4])}


def test_bad_folders_and_options_fail_with_one_clear_line(llama, tmp_path, capsys) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Us"}])
    out = str(tmp_path / "out.jsonl")

    def fails(args: list[str], words: str) -> None:
        assert main(["generate", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "Traceback" not in err, err

    fails(["--model", str(tmp_path / "nowhere"), "--prompts", prompts, "--output", out], "does not exist")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(open(os.path.join(llama, "config.json")).read())
    fails(["--model", str(bare), "--prompts", prompts, "--output", out], "holds no tokenizer")
    fails(["--model", llama, "--prompts", prompts, "--output", out, "--do-sample", "--top-p", "3"],
          "--top-p: top_p=3.0 must be in (0, 1]")
    fails(["--model", llama, "--prompts", prompts], "give --prompts FILE.jsonl and --output OUT.jsonl")
    fails(["--model", llama, "--prompts", str(tmp_path / "missing.jsonl"), "--output", out], "cannot read")
    write_jsonl(out, ['{"id": 1, "text": "ok"}', "garbage"])
    fails(["--model", llama, "--prompts", prompts, "--output", out], "out.jsonl:2 is not an output record")
    fails(["--model", llama, "--prompts", prompts, "--output", out + "2", "--max-model-len", "9999"],
          "max_model_len=9999 exceeds the model's 256 positions")
