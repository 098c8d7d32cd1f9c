"""Checkpoints in one process (no process group): exact resume, tags, atomic files, the
refusal of malicious pickles, export (``consolidate``, ``flexspeed export``) and 16-bit saves."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch

from flexspeed.runtime import checkpoint as ckpt
from flexspeed.runtime.checkpoint_io import (
    CheckpointError,
    UnsafeCheckpointError,
    commit_tag,
    find_unsafe,
    read_latest,
    read_metadata,
    remove_stale_temporaries,
    safe_torch_load,
    validate_tag,
    write_atomic,
)
from flexspeed.runtime.export import consolidate, resolve_dtype, save_16bit_model, write_state_dict
from tests.distributed._ckpt_common import N_AFTER, N_BEFORE, build_local, eval_loss, train
from tests.distributed._parity import make_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint after N_BEFORE steps, and the losses of the uninterrupted continuation."""
    root = str(tmp_path_factory.mktemp("ckpt"))
    engine, loader = build_local()
    it = iter(loader)
    train(engine, it, N_BEFORE)
    rng = torch.get_rng_state()
    engine.save_checkpoint(root, client_state={"epoch": 3, "note": "hi", "t": torch.arange(3), "pair": (1, 2.5)})
    after = train(engine, it, N_AFTER)
    return SimpleNamespace(root=root, after=after, rng=rng, eval=eval_loss(engine.module))


@pytest.fixture()
def copy(saved, tmp_path):
    """A private copy of the saved checkpoint, free to corrupt."""
    dst = str(tmp_path / "ckpt")
    shutil.copytree(saved.root, dst)
    return dst


def test_resume_is_exact_and_restores_everything(saved):
    engine, loader = build_local(seed=5)
    torch.manual_seed(1234)  # a different RNG stream: the checkpoint must restore the saved one
    path, client = engine.load_checkpoint(saved.root)
    assert path == os.path.join(saved.root, f"global_step{N_BEFORE}")
    assert torch.equal(torch.get_rng_state(), saved.rng)
    assert client["epoch"] == 3 and client["note"] == "hi" and client["pair"] == (1, 2.5)
    assert torch.equal(client["t"], torch.arange(3))
    assert engine.global_steps == N_BEFORE and engine.micro_steps == N_BEFORE * engine.gradient_accumulation_steps()
    assert engine.global_samples == N_BEFORE * 8 and loader.state_dict()["offset"] == N_BEFORE * 2
    got = train(engine, iter(loader), N_AFTER)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(saved.after), rtol=0, atol=1e-6)


def test_resume_without_optimizer_state_diverges(saved):
    """Control: the resume test is sensitive to the optimizer state it restores."""
    engine, loader = build_local(seed=5)
    engine.load_checkpoint(saved.root, load_optimizer_states=False)
    got = train(engine, iter(loader), N_AFTER)
    assert max(abs(a - b) for a, b in zip(got, saved.after)) > 1e-4


def test_load_module_only_keeps_counters(saved):
    engine, _ = build_local(seed=5)
    path, client = engine.load_checkpoint(saved.root, load_module_only=True)
    assert engine.global_steps == 0 and client["epoch"] == 3
    assert not engine.optimizer.state  # untouched: nothing was stepped in this engine


def test_missing_latest_warns_and_returns_none(tmp_path):
    engine, _ = build_local()
    with pytest.warns(UserWarning, match="no 'latest' file") as caught:
        assert engine.load_checkpoint(str(tmp_path)) == (None, None)
    assert str(tmp_path) in str(caught[0].message)


def test_checkpoint_without_checksums_loads_with_one_warning(saved, copy):
    """A checkpoint saved before checksums existed (format version 1) resumes exactly, warning once."""
    as_unverified(copy)
    engine, loader = build_local(seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.load_checkpoint(copy)
        engine.load_checkpoint(copy)
    unverified = [w for w in caught if "cannot be verified" in str(w.message)]
    assert len(unverified) == 1 and copy in str(unverified[0].message)
    assert train(engine, iter(loader), N_AFTER) == saved.after


def test_manifest_records_every_file_and_record(saved):
    from flexspeed.runtime.checkpoint_verify import checksum

    tag_dir = os.path.join(saved.root, f"global_step{N_BEFORE}")
    with open(os.path.join(tag_dir, "flexspeed_checkpoint.json")) as f:
        integrity = json.load(f)["integrity"]
    on_disk = sorted(os.path.relpath(os.path.join(d, n), tag_dir) for d, _, files in os.walk(tag_dir) for n in files
                     if n != "flexspeed_checkpoint.json")
    assert sorted(integrity["files"]) == on_disk
    for name, entry in integrity["files"].items():
        with open(os.path.join(tag_dir, name), "rb") as f:
            data = f.read()
        assert entry == {"size": len(data), "crc32": f"{checksum(data):08x}"}, name
    md = read_metadata(os.path.join(tag_dir, "state"))
    assert len(integrity["records"]) == len(md.storage_data)
    for rec in integrity["records"]:
        with open(os.path.join(tag_dir, "state", rec["file"]), "rb") as f:
            f.seek(rec["start"])
            assert f"{checksum(f.read(rec['length'])):08x}" == rec["crc32"]


def test_unknown_and_incomplete_tags_are_clear_errors(copy):
    engine, _ = build_local()
    with pytest.raises(CheckpointError, match=r"'nope' not found .*global_step3"):
        engine.load_checkpoint(copy, tag="nope")
    os.remove(os.path.join(copy, f"global_step{N_BEFORE}", "flexspeed_checkpoint.json"))
    with pytest.raises(CheckpointError, match="not a complete flexspeed checkpoint"):
        engine.load_checkpoint(copy)


@pytest.mark.parametrize("tag", ["../evil", "a/b", "/abs", "", ".hidden", "a..b", "latest", "x" * 129, "a b",
                                 "a\\b", "tag\n", None, 1.5])
def test_bad_tags_are_rejected(tag):
    with pytest.raises(ValueError, match="not allowed: a tag names one directory"):
        validate_tag(tag)


@pytest.mark.parametrize("tag", ["global_step10", "best", "epoch-3.5", "run_1+ft", "k=v"])
def test_good_tags(tag):
    assert validate_tag(tag) == tag
    assert validate_tag(7) == "7"


def test_save_rejects_bad_tag_and_unsafe_client_state(tmp_path):
    engine, _ = build_local()
    with pytest.raises(ValueError, match=r"'\.\./x' is not allowed"):
        engine.save_checkpoint(str(tmp_path), tag="../x")
    with pytest.raises(ValueError, match="client_state cannot be stored safely"):
        engine.save_checkpoint(str(tmp_path), client_state={"obj": SimpleNamespace(a=1)})
    assert not os.path.exists(os.path.join(str(tmp_path), "latest"))


def test_latest_with_a_path_trick_is_refused(copy):
    with open(os.path.join(copy, "latest"), "w") as f:
        f.write("../../etc")
    engine, _ = build_local()
    with pytest.raises(ValueError, match="not allowed"):
        engine.load_checkpoint(copy)


def test_atomic_commit_resave_and_stale_cleanup(tmp_path):
    root = str(tmp_path)
    for content in (b"one", b"two"):  # re-saving a tag replaces it whole
        tmp = os.path.join(root, ".flexspeed-tmp-t-1")
        os.makedirs(tmp)
        write_atomic(os.path.join(tmp, "f"), content)
        commit_tag(root, tmp, "t", "1", save_latest=True)
    assert open(os.path.join(root, "t", "f"), "rb").read() == b"two"
    assert read_latest(root) == "t"
    assert sorted(os.listdir(root)) == ["latest", "t"]
    os.makedirs(os.path.join(root, ".flexspeed-tmp-dead-2", "state"))
    remove_stale_temporaries(root)
    assert sorted(os.listdir(root)) == ["latest", "t"]


def test_interrupted_resave_falls_back_to_the_old_copy(copy):
    tag_dir = os.path.join(copy, f"global_step{N_BEFORE}")
    os.rename(tag_dir, os.path.join(copy, f".flexspeed-old-global_step{N_BEFORE}-abc"))  # killed mid-swap
    engine, _ = build_local()
    with pytest.warns(UserWarning, match="was being replaced"):
        path, _ = engine.load_checkpoint(copy)
    assert path.endswith("-abc") and engine.global_steps == N_BEFORE


def test_only_tensors_go_through_dcp(saved):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_metadata(os.path.join(saved.root, f"global_step{N_BEFORE}", "state"))
    assert all(isinstance(v, TensorStorageMetadata) for v in md.state_dict_metadata.values())
    assert any(k.startswith("optim.state.") for k in md.state_dict_metadata)


# ---- malicious pickles ----------------------------------------------------------------------------
class _Evil:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload(marker: str) -> bytes:
    return pickle.dumps(_Evil(marker), protocol=2)


def as_unverified(root: str) -> None:
    """Make the checkpoint under ``root`` look like one saved before checksums (format version 1)."""
    file = os.path.join(root, f"global_step{N_BEFORE}", "flexspeed_checkpoint.json")
    with open(file) as f:
        manifest = json.load(f)
    manifest.pop("integrity")
    manifest["format_version"] = 1
    with open(file, "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("verified", [True, False])
@pytest.mark.parametrize("target", [".metadata", "engine_state.pt", "client_state.pt", "rng/rank0.pt"])
def test_malicious_pickle_in_place_of_a_file_is_refused(copy, tmp_path, target, verified):
    """With checksums the file fails its check before it is unpickled; without, the restricted unpickler refuses."""
    marker = str(tmp_path / "pwned")
    tag_dir = os.path.join(copy, f"global_step{N_BEFORE}")
    path = os.path.join(tag_dir, "state", target) if target == ".metadata" else os.path.join(tag_dir, target)
    with open(path, "wb") as f:
        f.write(_payload(marker))
    if not verified:
        as_unverified(copy)
    engine, _ = build_local()
    with pytest.raises(CheckpointError) as info, warnings.catch_warnings(record=True):
        engine.load_checkpoint(copy)
    if verified:
        assert f"{path} failed its size check" in str(info.value) or f"{path} failed its sha256" in str(info.value)
    else:
        assert isinstance(info.value, UnsafeCheckpointError)
        assert "pickled object outside the allow-list" in str(info.value)
    assert not os.path.exists(marker)


def test_malicious_pickle_inside_tensor_data_is_refused(copy, tmp_path):
    marker = str(tmp_path / "pwned")
    state_dir = os.path.join(copy, f"global_step{N_BEFORE}", "state")
    md = read_metadata(state_dir)
    payload = _payload(marker)
    for info in md.storage_data.values():  # overwrite the start of every stored tensor
        with open(os.path.join(state_dir, info.relative_path), "r+b") as f:
            f.seek(info.offset)
            f.write(payload[:info.length])
    engine, _ = build_local()
    with pytest.raises(CheckpointError, match="failed its crc32 check for the record"):
        engine.load_checkpoint(copy)
    with pytest.raises(CheckpointError, match="failed its crc32 check for the record"):
        consolidate(copy)
    as_unverified(copy)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"), warnings.catch_warnings(record=True):
        engine.load_checkpoint(copy)
    with pytest.raises(UnsafeCheckpointError):
        consolidate(copy)
    assert not os.path.exists(marker)


def test_pickled_non_tensor_items_in_dcp_are_refused(tmp_path):
    """DCP would torch.load(weights_only=False) a non-tensor item; flexspeed's planner refuses it."""
    import torch.distributed.checkpoint as dcp

    from flexspeed.runtime.checkpoint_io import SafeFileSystemReader, SafeLoadPlanner, quiet_single_process

    with quiet_single_process():
        dcp.save({"model": {"w": ["a python list"]}}, checkpoint_id=str(tmp_path), no_dist=True)
        with pytest.raises(BaseException) as info:  # DCP wraps it in CheckpointException
            dcp.load({"model": {"w": ["x"]}}, storage_reader=SafeFileSystemReader(str(tmp_path)),
                     planner=SafeLoadPlanner(), no_dist=True)
    assert "is a pickled Python object" in str(find_unsafe(info.value))


def test_safe_torch_load_accepts_plain_data(tmp_path):
    path = str(tmp_path / "ok.pt")
    torch.save({"a": torch.ones(2), "b": [1, "x", (2.0, None)]}, path)
    assert safe_torch_load(path)["b"] == [1, "x", (2.0, None)]


# ---- export ---------------------------------------------------------------------------------------
def test_consolidate_and_cli_export_load_into_the_plain_model(saved, tmp_path):
    from flexspeed.cli.main import main

    full = consolidate(saved.root)
    model = make_model(seed=9)
    model.load_state_dict(full)
    engine, _ = build_local(seed=9)
    engine.load_checkpoint(saved.root)
    want = eval_loss(engine.module)
    assert eval_loss(model) == pytest.approx(want, abs=1e-6)
    for out, fmt in (("m.safetensors", None), ("m.bin", "pt")):
        args = ["export", saved.root, str(tmp_path / out)] + (["--format", fmt] if fmt else [])
        assert main(args) == 0
        if out.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(str(tmp_path / out))
        else:
            sd = torch.load(str(tmp_path / out), weights_only=True)
        plain = make_model(seed=11)
        plain.load_state_dict(sd)
        assert eval_loss(plain) == pytest.approx(want, abs=1e-6)
    assert main(["export", saved.root, str(tmp_path / "h.safetensors"), "--dtype", "bf16", "--tag",
                 f"global_step{N_BEFORE}"]) == 0


def test_export_dtypes_and_errors(saved, tmp_path, capsys):
    from flexspeed.cli.main import main

    tag_dir = os.path.join(saved.root, f"global_step{N_BEFORE}")
    assert torch.equal(consolidate(tag_dir)["lm_head.weight"], consolidate(saved.root)["lm_head.weight"])
    half = consolidate(saved.root, dtype="bf16")
    assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        resolve_dtype("int8")
    assert main(["export", str(tmp_path), str(tmp_path / "x.pt")]) == 1
    assert "no 'latest' file" in capsys.readouterr().err


def test_save_16bit_model_single_process(saved, tmp_path):
    engine, _ = build_local()
    engine.load_checkpoint(saved.root)
    assert save_16bit_model(engine, str(tmp_path), "model.safetensors")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.float16}  # fp32 engine: fp16, as the name says
    plain = make_model(seed=3)
    plain.load_state_dict({k: v.float() for k, v in sd.items()})
    assert eval_loss(plain) == pytest.approx(eval_loss(engine.module), abs=1e-2)
    assert ckpt.save_16bit_model(engine, str(tmp_path), "pytorch_model.bin", dtype="bf16")
    sd = torch.load(str(tmp_path / "pytorch_model.bin"), weights_only=True)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="plain file name"):
        save_16bit_model(engine, str(tmp_path), "../x.bin")


def test_save_16bit_model_stage3_needs_the_gather_flag(tmp_path):
    stub = SimpleNamespace(zero_strategy=SimpleNamespace(stage=3),
                           config=SimpleNamespace(zero_optimization=SimpleNamespace(
                               stage3_gather_16bit_weights_on_model_save=False)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert save_16bit_model(stub, str(tmp_path)) is False
    assert "stage3_gather_16bit_weights_on_model_save" in str(caught[0].message)
    assert not os.listdir(str(tmp_path))


def test_write_state_dict_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="format='npz'"):
        write_state_dict({"a": torch.ones(1)}, str(tmp_path / "x"), "npz")


# ---- edge cases of what is saved ------------------------------------------------------------------
class _CountingSGD(torch.optim.SGD):
    """SGD that keeps a Python int and a None in its per-parameter state."""

    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    st = self.state[p]
                    st["count"] = int(st.get("count", 0)) + 1
                    st["unused"] = None
        return out


def test_python_numbers_in_optimizer_state_round_trip(tmp_path):
    def make(params):
        return _CountingSGD(params, lr=0.1, momentum=0.9)

    engine, loader = build_local(make_optimizer=make)
    train(engine, iter(loader), 2)
    engine.save_checkpoint(str(tmp_path))
    other, _ = build_local(seed=3, make_optimizer=make)
    other.load_checkpoint(str(tmp_path))
    for p, q in zip(engine.module.parameters(), other.module.parameters()):
        a, b = engine.optimizer.state[p], other.optimizer.state[q]
        assert b["count"] == a["count"] == 2 and isinstance(b["count"], int)
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_save_before_any_step_leaves_the_optimizer_alone(tmp_path):
    engine, loader = build_local()
    engine.save_checkpoint(str(tmp_path), tag="start")
    assert not engine.optimizer.state  # torch's get_state_dict would have run a step at lr 0
    other, _ = build_local(seed=3)
    other.load_checkpoint(str(tmp_path))
    assert not other.optimizer.state
    a = train(engine, iter(loader), 2)
    b = train(other, iter(other.training_dataloader), 2)
    assert a == b


def test_loss_scaler_and_hyperparameters_round_trip(tmp_path):
    from flexspeed.runtime.precision import LossScaler

    engine, loader = build_local()
    engine.loss_scaler = LossScaler(initial_scale_power=8, loss_scale_window=2)
    train(engine, iter(loader), 3)
    engine.optimizer.param_groups[0]["weight_decay"] = 0.123
    engine.save_checkpoint(str(tmp_path))
    other, _ = build_local(seed=3)
    other.loss_scaler = LossScaler()
    other.load_checkpoint(str(tmp_path))
    assert other.loss_scaler.state_dict() == engine.loss_scaler.state_dict()
    assert other.optimizer.param_groups[0]["weight_decay"] == 0.123
    assert other.get_lr() == engine.get_lr()


def test_exclude_frozen_parameters_and_strict_loading(tmp_path):
    model = make_model()
    model.transformer.wpe.weight.requires_grad_(False)
    engine, loader = build_local(model=model)
    train(engine, iter(loader), 1)
    engine.save_checkpoint(str(tmp_path), exclude_frozen_parameters=True)
    assert "transformer.wpe.weight" not in consolidate(str(tmp_path))
    frozen_again = make_model(seed=3)
    frozen_again.transformer.wpe.weight.requires_grad_(False)
    other, _ = build_local(model=frozen_again)
    other.load_checkpoint(str(tmp_path))  # strict, yet the excluded key may be absent
    assert torch.equal(other.module.transformer.h[0].mlp.c_fc.weight, engine.module.transformer.h[0].mlp.c_fc.weight)

    bigger = make_model(seed=3, n_layer=3)
    third, _ = build_local(model=bigger)
    with pytest.raises(CheckpointError, match=r"missing keys \['transformer.h.2.*load_module_strict=False"):
        third.load_checkpoint(str(tmp_path), load_module_only=True)
    third.load_checkpoint(str(tmp_path), load_module_strict=False, load_module_only=True)
    assert torch.equal(third.module.transformer.h[1].attn.c_attn.weight,
                       engine.module.transformer.h[1].attn.c_attn.weight)


def test_metadata_claiming_huge_tensors_is_refused(copy):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state_dir = os.path.join(copy, f"global_step{N_BEFORE}", "state")
    md = read_metadata(state_dir)
    key = next(k for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
               and k.startswith("model."))
    md.state_dict_metadata[key].size = torch.Size([1 << 20, 1 << 12])  # 16 GiB of fp32
    with open(os.path.join(state_dir, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(CheckpointError, match=r"\.metadata failed its size check"):
        consolidate(copy)
    as_unverified(copy)  # without checksums, the size claim itself is checked before allocating
    with pytest.raises(CheckpointError, match="truncated or was tampered with"):
        consolidate(copy)


def test_save_latest_false_and_load_after_a_backward(saved, tmp_path):
    root = str(tmp_path)
    shutil.copytree(saved.root, root, dirs_exist_ok=True)
    engine, loader = build_local()
    train(engine, iter(loader), 1)
    engine.save_checkpoint(root, tag="side", save_latest=False)
    assert read_latest(root) == f"global_step{N_BEFORE}"
    fresh, fresh_loader = build_local(seed=3)
    x, y = next(iter(fresh_loader))
    fresh.backward(fresh(x, y))  # gradients exist, optimizer state does not yet
    fresh.load_checkpoint(root)
    assert len(fresh.optimizer.state) == len(list(fresh.module.parameters()))
    assert all(p.grad is not None for p in fresh.module.parameters())
