"""The corruption matrix: damaged or hostile checkpoints never load, never run code, never change the engine.

One world-2 group per ZeRO stage (2 and 3) trains, saves, and trains one more step (so a wrong
load would show in the weights). Then, for each case, rank 0 copies the checkpoint and damages the
copy (every file kind x truncate / zero / delete / bit flip / crafted pickle; symlinks; storage
paths leaving the tag; swapped or dropped records; manifest and engine-state field edits, with and
without checksums), and both ranks try to load it. Every case must raise, on both ranks, the same
``CheckpointError``/``ValueError`` naming a path in the copy; no pickle may run; weights,
optimizer state, counters, scheduler and RNG must be bit-identical to before the attempt.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings

import pytest
import torch

from flexspeed.testing import run_ranks
from tests.distributed._ckpt_common import build, train

TAG = "global_step2"
FILES = ["flexspeed_checkpoint.json", "engine_state.pt", "client_state.pt", "rng/rank0.pt", "rng/rank1.pt",
         "state/.metadata", "state/__0_0.distcp", "state/__1_0.distcp"]
OPS = ["truncate", "zero", "delete", "bitflip", "pickle"]


class _Evil:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _damage(path: str, op: str, marker: str) -> None:
    if op == "delete":
        os.remove(path)
        return
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if op == "truncate":
        data = data[: len(data) // 2]
    elif op == "zero":
        data = bytearray(len(data))
    elif op == "bitflip":
        data[len(data) // 2] ^= 0x10
    elif op == "pickle":
        data = bytearray(pickle.dumps(_Evil(marker), protocol=2))
    with open(path, "wb") as f:
        f.write(data)


def _unverified(tag_dir: str) -> None:
    """Strip the checksums: a checkpoint as saved before they existed (format version 1)."""
    _edit_manifest(tag_dir, lambda m: (m.pop("integrity"), m.__setitem__("format_version", 1)))


def _edit_manifest(tag_dir: str, edit) -> None:
    file = os.path.join(tag_dir, "flexspeed_checkpoint.json")
    with open(file) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(file, "w") as f:
        json.dump(manifest, f)


def _edit_metadata(tag_dir: str, edit) -> None:
    from flexspeed.runtime.checkpoint_io import read_metadata

    state = os.path.join(tag_dir, "state")
    md = read_metadata(state)
    edit(md)
    with open(os.path.join(state, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def _traversal(md, where: str) -> None:
    info = next(iter(md.storage_data.values()))
    info.relative_path = where


def _swap(md) -> None:
    keys = [k for k in md.storage_data if k.fqn.startswith("model.")][:2]
    a, b = md.storage_data[keys[0]], md.storage_data[keys[1]]
    md.storage_data[keys[0]], md.storage_data[keys[1]] = b, a


def _drop_optim(md) -> None:
    for key in [k for k in md.state_dict_metadata if k.startswith("optim.")]:
        del md.state_dict_metadata[key]
    for key in [k for k in md.storage_data if k.fqn.startswith("optim.")]:
        del md.storage_data[key]


def _rehash_metadata(tag_dir: str) -> None:
    """Record the edited ``.metadata``'s checksum in the manifest (and re-digest it): only the record check is left."""
    from flexspeed.runtime.checkpoint_verify import digest_of, hash_bytes

    with open(os.path.join(tag_dir, "state", ".metadata"), "rb") as f:
        entry = hash_bytes(f.read())

    def edit(m):
        m["integrity"]["files"]["state/.metadata"] = entry
        m["integrity"]["digest"] = digest_of(m)

    _edit_manifest(tag_dir, edit)


def _engine_field(tag_dir: str, value: int) -> None:
    path = os.path.join(tag_dir, "engine_state.pt")
    meta = torch.load(path, weights_only=True)
    meta["counters"]["global_steps"] = value
    buf = io.BytesIO()
    torch.save(meta, buf)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _symlink(tag_dir: str, rel: str) -> None:
    path = os.path.join(tag_dir, rel)
    real = path + ".real"
    os.rename(path, real)
    os.symlink(real, path)


def _cases() -> dict:
    """name -> function(tag_dir, root, marker) damaging the copy."""
    cases = {f"{rel}:{op}": (lambda t, r, m, rel=rel, op=op: _damage(os.path.join(t, rel), op, m))
             for rel in FILES for op in OPS}
    for legacy in (False, True):
        pre = (lambda t: _unverified(t)) if legacy else (lambda t: None)
        name = "legacy:" if legacy else ""
        cases.update({
            f"{name}metadata:traversal": lambda t, r, m, pre=pre: (
                _edit_metadata(t, lambda md: _traversal(md, "../../../other/state/__0_0.distcp")), pre(t)),
            f"{name}metadata:absolute": lambda t, r, m, pre=pre: (
                _edit_metadata(t, lambda md: _traversal(md, "/etc/passwd")), pre(t)),
            f"{name}metadata:no-optim": lambda t, r, m, pre=pre: (_edit_metadata(t, _drop_optim), pre(t)),
            f"{name}manifest:world_size=0": lambda t, r, m, pre=pre: (
                pre(t), _edit_manifest(t, lambda x: x.__setitem__("world_size", 0))),
            f"{name}manifest:world_size=-1": lambda t, r, m, pre=pre: (
                pre(t), _edit_manifest(t, lambda x: x.__setitem__("world_size", -1))),
            f"{name}manifest:global_steps=str": lambda t, r, m, pre=pre: (
                pre(t), _edit_manifest(t, lambda x: x.__setitem__("global_steps", "5"))),
            f"{name}engine:global_steps=-5": lambda t, r, m, pre=pre: (_engine_field(t, -5), pre(t)),
            f"{name}symlink:distcp": lambda t, r, m, pre=pre: (_symlink(t, "state/__0_0.distcp"), pre(t)),
            f"{name}symlink:rng": lambda t, r, m, pre=pre: (_symlink(t, "rng/rank1.pt"), pre(t)),
        })
    cases.update({
        "metadata:swapped-records": lambda t, r, m: _edit_metadata(t, _swap),
        "rehashed:metadata:swapped-records": lambda t, r, m: (_edit_metadata(t, _swap), _rehash_metadata(t)),
        "rehashed:metadata:no-optim": lambda t, r, m: (_edit_metadata(t, _drop_optim), _rehash_metadata(t)),
        "rehashed:metadata:traversal": lambda t, r, m: (
            _edit_metadata(t, lambda md: _traversal(md, "../../../other/state/__0_0.distcp")), _rehash_metadata(t)),
        "manifest:world_size=1": lambda t, r, m: _edit_manifest(t, lambda x: x.__setitem__("world_size", 1)),
        "manifest:has_optimizer_state=false": lambda t, r, m: _edit_manifest(
            t, lambda x: x.__setitem__("has_optimizer_state", False)),
        "manifest:integrity-dropped": lambda t, r, m: _edit_manifest(t, lambda x: x.pop("integrity")),
        "symlink:tag-dir": lambda t, r, m: _symlink(os.path.dirname(t), TAG),
        "symlink:latest": lambda t, r, m: (os.remove(os.path.join(r, "latest")),
                                           os.symlink("/etc/passwd", os.path.join(r, "latest"))),
        "latest:not-utf8": lambda t, r, m: open(os.path.join(r, "latest"), "wb").write(b"\xff\xfe\x00"),
        "latest:traversal": lambda t, r, m: open(os.path.join(r, "latest"), "w").write("../../etc"),
        "latest:missing-tag": lambda t, r, m: open(os.path.join(r, "latest"), "w").write("global_step9"),
    })
    return cases


def _snapshot(engine) -> dict:
    def local(t):
        return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()

    return {"params": {n: local(p) for n, p in engine.module.named_parameters()},
            "optim": [{k: local(v) if torch.is_tensor(v) else v for k, v in s.items()}
                      for s in engine.optimizer.state.values()],
            "counters": [engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps],
            "sched": repr(engine.lr_scheduler.state_dict()), "rng": torch.get_rng_state().clone()}


def _same(a: dict, b: dict) -> bool:
    if a["counters"] != b["counters"] or a["sched"] != b["sched"] or not torch.equal(a["rng"], b["rng"]):
        return False
    if any(not torch.equal(a["params"][n], b["params"][n]) for n in a["params"]):
        return False
    return len(a["optim"]) == len(b["optim"]) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in zip(a["optim"], b["optim"]))


def _matrix_group(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    from flexspeed.runtime import checkpoint_io

    out = {}
    inline = checkpoint_io.INLINE_CHECK_BYTES
    for stage in (2, 3):
        # these small records are checked on the loading thread; at stage 3 every record goes to the verify
        # thread instead (what large records do), so the matrix covers both paths
        checkpoint_io.INLINE_CHECK_BYTES = inline if stage == 2 else 0
        engine, loader = build(world, stage, zero_optimization={"stage": stage,
                                                               "stage3_param_persistence_threshold": 0})
        it = iter(loader)
        train(engine, it, 2)
        saved = os.path.join(root, f"saved{stage}")
        engine.save_checkpoint(saved)
        train(engine, it, 1)  # the engine now differs from the checkpoint: a wrong load would show
        before = _snapshot(engine)
        for name, damage in _cases().items():
            case = os.path.join(root, f"case{stage}", name.replace(":", "_").replace("/", "_"))
            marker = os.path.join(root, f"pwned-{stage}-{name.replace('/', '_')}")
            if rank == 0:
                shutil.copytree(saved, case)
                damage(os.path.join(case, TAG), case, marker)
            dist.barrier()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    engine.load_checkpoint(case)
                    result = ("loaded", "")
                except (ValueError, RuntimeError) as e:  # CheckpointError is a RuntimeError
                    result = (type(e).__name__, str(e))
            out[(stage, name)] = {"result": result, "unchanged": _same(before, _snapshot(engine)),
                                  "ran_code": os.path.exists(marker), "case": case}
        # and the undamaged checkpoint still loads, on both ranks
        path, _ = engine.load_checkpoint(saved)
        out[(stage, "good")] = {"path": path, "steps": engine.global_steps}
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("matrix"))
    return run_ranks(_matrix_group, world_size=2, args=(root,), timeout=600)


def test_no_damaged_checkpoint_loads_and_the_engine_is_untouched(matrix):
    r0, r1 = matrix
    bad = []
    for key, got in r0.items():
        if key[1] == "good":
            assert got["steps"] == 2 and r1[key]["steps"] == 2
            continue
        kind, message = got["result"]
        other = r1[key]["result"]
        if kind not in ("CheckpointError", "UnsafeCheckpointError", "ValueError"):
            bad.append(f"{key}: {kind} {message[:200]}")
        elif got["case"] not in message:
            bad.append(f"{key}: the error names no file in the checkpoint: {message[:300]}")
        if other != got["result"]:
            bad.append(f"{key}: ranks disagree: {got['result']} vs {other}")
        for rank, res in enumerate((got, r1[key])):
            if not res["unchanged"]:
                bad.append(f"{key}: rank {rank}'s engine changed")
            if res["ran_code"]:
                bad.append(f"{key}: a pickle ran code")
    assert not bad, "\n".join(bad)
    assert len([k for k in r0 if k[1] != "good"]) == 2 * len(_cases())


def test_errors_name_the_check(matrix):
    r0, _ = matrix
    msg = {name: r0[(2, name)]["result"][1] for _, name in r0 if name != "good"}
    assert "failed its crc32 check" in msg["state/__0_0.distcp:bitflip"]
    assert "failed its size check" in msg["engine_state.pt:truncate"]
    assert "failed its path check" in msg["legacy:metadata:traversal"]
    assert "failed its path check" in msg["legacy:metadata:absolute"]
    assert "failed its entry check" in msg["legacy:metadata:no-optim"]
    assert "failed its schema check: counters.global_steps = -5" in msg["legacy:engine:global_steps=-5"]
    assert "failed its schema check: world_size = 0" in msg["legacy:manifest:world_size=0"]
    assert "failed its digest check" in msg["manifest:world_size=1"]
    assert "symbolic link" in msg["symlink:tag-dir"] and "symbolic link" in msg["symlink:latest"]
    assert "failed its record check" in msg["rehashed:metadata:swapped-records"]
    assert "failed its record check" in msg["rehashed:metadata:no-optim"]
    assert "failed its path check" in msg["rehashed:metadata:traversal"]
    assert "root:" not in msg["symlink:latest"]  # the link's target is not read, let alone printed
    assert "rng/rank1.pt is missing" in msg["rng/rank1.pt:delete"]
