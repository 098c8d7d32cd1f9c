"""The native decode step driven from a fused runner, and the shared-memory all-reduce of its
tensor-parallel form (the kernel and its structs: :mod:`flexspeed.inference.native`).

:meth:`NativeDecoder.unsupported` says why a runner cannot use the kernel (a packed or blocked
int4 weight, post-norm layers, a tensor-parallel model without its group, ...), in which case
the runner stays on torch.
"""

from __future__ import annotations

import ctypes
import os
import tempfile

import torch
import torch.nn as nn

from flexspeed.inference.native import library
from flexspeed.inference.native_abi import BF16, F32, I4, I8, TP, Gen, Layer, Linear, Step, check
from flexspeed.inference.native_structs import (Unsupported, activation_code, embed_struct, linear_struct,
                                                norm_struct, parts_struct)

__all__ = ["NativeDecoder", "ShmAllReduce"]


class ShmAllReduce:
    """Sum fp32 vectors over the ranks of ``group``, all on this host, through shared memory.

    gloo's all-reduce of a hidden state (3 KB) takes ~1.4 ms on loopback on the 2-core machine
    (a send/recv round trip 0.16 ms), and a decode step of a 12-layer model needs 24 of them;
    this takes microseconds. The segment is a file in ``/dev/shm`` (the temp directory where
    there is none) that rank 0 creates, every rank maps, and rank 0 unlinks once all have. A rank
    that stops answering for ``timeout`` seconds makes the others raise instead of hang.
    Created collectively (every rank of ``group`` at the same point). Two uses: the native decode
    step's exchanges (:attr:`tp`, in C, several per call) and the row-parallel layers' hook on
    torch's path (:meth:`reduce_`: the prompt's projections), each with its own segment.
    """

    def __init__(self, lib: ctypes.CDLL, group, cap: int, timeout: float = 300.0) -> None:
        import socket
        import uuid

        import torch.distributed as dist

        self.lib, self.cap, self.timeout = lib, int(cap), float(timeout)
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        hosts: list = [None] * self.world
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        if len(set(hosts)) != 1:
            raise Unsupported(f"the tensor-parallel ranks run on several hosts ({sorted(set(hosts))})")
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        name = [os.path.join(base, f"flexspeed-tp-{uuid.uuid4().hex}")] if self.rank == 0 else [None]
        dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0), group=group)
        nbytes = int(lib.fs_shm_bytes(self.world, self.cap))
        if self.rank == 0:
            with open(name[0], "wb") as f:
                f.truncate(nbytes)  # zeros: every sequence number starts at 0
        dist.barrier(group=group)
        self.segment = torch.from_file(name[0], shared=True, size=nbytes, dtype=torch.uint8)
        dist.barrier(group=group)
        if self.rank == 0:
            os.unlink(name[0])
        # the kernel's view (its exchange count advances in C, the same on every rank); a decode
        # step's struct points at it (Step.tp)
        self.tp = TP(self.segment.data_ptr(), self.rank, self.world, self.cap, 0, self.timeout, 0)

    def __call__(self, x: torch.Tensor, accum: torch.Tensor | None = None) -> None:
        """``x`` (contiguous fp32) <- its sum over the ranks; or ``accum += `` that sum. Vectors
        longer than the segment's ``cap`` go through it in pieces (every rank cuts them alike)."""
        n = x.numel()
        for i in range(0, max(n, 1), self.cap):
            m = min(self.cap, n - i)
            check(self.lib.fs_shm_allreduce(ctypes.byref(self.tp), x.data_ptr() + 4 * i, m,
                                            accum.data_ptr() + 4 * i if accum is not None else None),
                  "fs_shm_allreduce", f"tensor-parallel all-reduce of {n} floats, waiting up to {self.timeout:.0f} s")

    def reduce_(self, t: torch.Tensor) -> None:
        """``t`` (a CPU tensor of any float dtype and layout) <- its sum over the ranks, in place:
        the row-parallel layers' hook (:attr:`TensorParallelPlan.reduce`). The sum is taken in fp32."""
        if t.dtype == torch.float32 and t.is_contiguous():
            self(t)
            return
        f = t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        self(f)
        t.copy_(f)

    @classmethod
    def for_group(cls, group, cap: int = 1 << 18) -> ShmAllReduce | None:
        """One for ``group`` (collective), or ``None`` where its ranks cannot share memory (several
        hosts, no native library); ``cap`` floats per piece."""
        lib = library()
        ok = torch.tensor([1 if lib is not None else 0])
        import torch.distributed as dist

        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)  # every rank takes the same branch
        if not int(ok):
            return None
        try:
            return cls(lib, group, cap)
        except Unsupported:
            return None


# ------------------------------------------------------------------------------ module -> struct


class NativeDecoder:
    """Runs a :class:`FusedRunner`'s single-token steps through the C kernel.

    Structs are rebuilt whenever a module or weight of the runner changed (quantization,
    ``model.to``); the cache pointers are set per call.
    """

    def __init__(self, runner) -> None:
        self.runner, self.lib = runner, library()
        self._checks: list[tuple] | None = None
        self._reason: str | None = None
        self._cache_id: tuple | None = None
        self._scratch = torch.empty(0)
        self.keep: list[torch.Tensor] = []
        self._shm: ShmAllReduce | None = None
        self.tp_group = None

    def __getstate__(self) -> dict:  # ctypes structs hold raw pointers: copies rebuild them
        return {"runner": self.runner}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["runner"])

    # ---------------------------------------------------------------- structs

    def _modules(self) -> tuple[list, list, nn.Module]:
        r = self.runner
        finals = [r._module(p) for p in r.arch.final_paths]
        return [layer.parts() for layer in r.layers], finals, r.root.get_submodule(r.arch.head_path)

    def _build(self, parts: list, finals: list, head: nn.Module) -> None:
        from flexspeed.inference.tp import tp_size_of

        r = self.runner
        if tp_size_of(r.root) != 1 and getattr(r, "tp_group", None) is None:
            raise Unsupported("the model is tensor-parallel but the runner has no tp_group (init_inference sets it)")
        keep: list[torch.Tensor] = []
        dims = getattr(r.arch, "dims", None)
        one_plus = getattr(dims, "norm", "") == "rms1p"  # Gemma: (1 + w) * x
        layers = (Layer * len(parts))()
        for i, (layer, (n1, qkv, out, n2, up, down)) in enumerate(zip(r.layers, parts)):
            if not layer.pre_norm:
                raise Unsupported(f"layer {i} normalises after attention (post-norm)")
            p = f"layer {i}"
            hq, hkv, hd = layer.n_heads, layer.n_kv_heads, layer.head_dim
            s = layers[i]
            s.norm1, s.norm2 = norm_struct(n1, f"{p} norm1", keep, one_plus), norm_struct(n2, f"{p} norm2", keep,
                                                                                             one_plus)
            s.qkv, s.n_qkv_parts = parts_struct(qkv, f"{p} qkv", keep, s.qkv_parts)
            s.up, s.n_up_parts = parts_struct(up, f"{p} up", keep, s.up_parts)
            s.out, s.down = linear_struct(out, f"{p} out", keep), linear_struct(down, f"{p} down", keep)
            s.act, s.gated, s.parallel = activation_code(layer.act), int(layer.gated), int(layer.parallel)
            s.n_heads, s.n_kv, s.head_dim, s.scale = hq, hkv, hd, float(layer.scale)
            s.rot_dim = getattr(dims, "rotary_dim", 0) or hd  # GPT-NeoX rotary_pct < 1: the leading dims only
            if s.rot_dim % 2 or s.rot_dim > hd:
                raise Unsupported(f"{p}: rotary embeddings over {s.rot_dim} of {hd} head dims (odd, or more)")
            if hq % hkv or s.qkv.n != (hq + 2 * hkv) * hd or s.out.k != hq * hd:
                raise Unsupported(f"{p}: projection shapes do not match {hq} heads, {hkv} kv heads of {hd}")
            if s.down.k != (s.up.n // 2 if layer.gated else s.up.n):
                raise Unsupported(f"{p}: the MLP's up and down projections do not match")
        norms = [m for m in finals if m is not None]
        if len(norms) != 1:
            raise Unsupported("the model has a projection after its final norm (OPT project_out)")
        self.layers, self.final = layers, norm_struct(norms[0], "final norm", keep, one_plus)
        self.head = linear_struct(head, "lm_head", keep)
        self.keep = keep
        self.tp_group = getattr(r, "tp_group", None) if tp_size_of(r.root) != 1 else None
        if self.tp_group is not None:  # each rank computes its block of the (replicated) head's rows
            import torch.distributed as dist

            rank, world = dist.get_rank(self.tp_group), dist.get_world_size(self.tp_group)
            per = -(-self.head.n // world)
            r0, r1 = min(self.head.n, rank * per), min(self.head.n, (rank + 1) * per)
            self.head_rows, self.head_per, self.n_vocab = (r0, r1), per, self.head.n
            self.head = _row_slice(self.head, r0, r1)
        self._final_p, self._head_p = ctypes.byref(self.final), ctypes.byref(self.head)
        if any(s.qkv.k != self.head.k for s in layers):
            raise Unsupported("layers and head disagree on the hidden size")

    def _watch(self, used: list[nn.Module], pointers: set[int]) -> list[tuple]:
        """What the structs depend on: every (dict, key, object) on the paths from the root to the
        modules used and every tensor of those modules; for the modules in ``pointers`` (one
        layer's and the head's: ``model.to`` swaps every ``param.data`` at once) the data
        pointer too. About 300 identity checks for OPT-125M, some 15 us per step."""
        root = self.runner.root
        paths: dict[int, str] = {}
        for name, mod in root.named_modules(remove_duplicate=False):
            paths.setdefault(id(mod), name)
        checks: dict[tuple[int, str], tuple] = {}
        for mod in [sub for m in used for sub in m.modules()]:  # a ConcatLinear's parts too
            path = paths.get(id(mod))
            if path:  # each step down from the root
                parent = root
                for part in path.split("."):
                    child = parent._modules[part]
                    checks[(id(parent._modules), part)] = (parent._modules, part, child, None)
                    parent = child
            for d in (mod._parameters, mod._buffers):
                for key, t in d.items():
                    ptr = t.data_ptr() if t is not None and id(mod) in pointers else None
                    checks[(id(d), key)] = (d, key, t, ptr)
        return list(checks.values())

    def _fresh(self) -> bool:
        for d, key, obj, ptr in self._checks:
            cur = d.get(key)
            if cur is not obj or (ptr is not None and cur.data_ptr() != ptr):
                return False
        return True

    def unsupported(self) -> str | None:
        """Why this runner cannot use the kernel now, or ``None`` if it can."""
        if self.lib is None:
            return "the native kernel is not available (no C compiler, or FLEXSPEED_NATIVE=0)"
        if self._checks is not None and self._fresh():
            return self._reason
        parts, finals, head = self._modules()
        used = [m for p in parts for m in p] + [m for m in finals if m is not None] + [head]
        pointers = {id(m) for m in [*(parts[0] if parts else ()), *finals, head] if m is not None}
        self._checks, self._reason, self._cache_id = self._watch(used, pointers), None, None
        if self.runner.own_layers is not None:  # wrappers outside the root's tree: watch them too
            self._checks += [(layer.__dict__, "_modules", layer.__dict__["_modules"], None)
                             for layer in self.runner.own_layers]
        try:
            self._build(parts, finals, head)
        except Unsupported as exc:
            self._reason = str(exc)
        return self._reason

    # ---------------------------------------------------------------- call

    def forward(self, x: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], start: int,
                key_mask: torch.Tensor | None, rope: tuple | None) -> torch.Tensor:
        """fp32 logits (B, 1, V) for embedded tokens ``x`` (B, 1, C) at cache position ``start``.

        ``k``/``v``: the per-layer fp32 or bf16 cache buffers (B, H_kv, T_max, hd), written at ``start``.
        """
        B, _, C = x.shape
        t_max, nt = self._bind(k, v, B, C)
        h = x.reshape(B, C).to(torch.float32, copy=True)
        logits = self._logits(B)
        # under tensor parallelism the same call sums each half layer's partial projection over the
        # ranks through shared memory into the residual stream, and gathers the head's row blocks
        step, _held = self._step(B, C, start, t_max, nt, key_mask, rope)  # _held: what step points into
        check(self.lib.fs_forward(self.layers, len(self.layers), self._final_p, self._head_p, h.data_ptr(),
                                  logits.data_ptr(), ctypes.byref(step)), "fs_forward",
              f"decode step, {B} rows{self._tp_what()}")
        return logits.view(B, 1, -1)  # fp32: the sampler works in fp32 anyway

    def _logits(self, B: int) -> torch.Tensor:
        """The (B, V) fp32 output of a call: every rank's whole vocabulary under tensor parallelism
        (gathered in the call), else the head's rows."""
        return torch.empty(B, self.n_vocab if self.tp_group is not None else self.head.n)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits (B, 1, V) of the final norm and head for hidden states ``x`` (B, 1, C): under
        tensor parallelism each rank computes its block of the (replicated) head's rows and the
        blocks are gathered (the prompt's last row; torch's path reads every row on every rank)."""
        B, _, C = x.shape
        nt = torch.get_num_threads()
        need = self.lib.fs_scratch_floats(None, 0, self.head, B, C, 1, nt)
        if self._scratch.numel() < need:
            self._scratch, self._cache_id = torch.empty(need), None
        h = x.reshape(B, C).to(torch.float32, copy=True)
        logits = self._logits(B)
        step, keep = self._step(B, C, 0, 1, nt, None, None)
        check(self.lib.fs_forward(None, 0, self._final_p, self._head_p, h.data_ptr(), logits.data_ptr(),
                                  ctypes.byref(step)), "fs_forward", f"the head over {B} rows{self._tp_what()}")
        del keep
        return logits.view(B, 1, -1)

    def _bind(self, k: list[torch.Tensor], v: list[torch.Tensor], B: int, C: int) -> tuple[int, int]:
        """Point the layer structs at the cache buffers and size the scratch; (T_max, threads)."""
        t_max, nt = k[0].shape[2], torch.get_num_threads()
        # the buffers themselves are held (not their addresses: a new cache may reuse some of them)
        current = ((B, t_max, nt), *k, *v)
        held = self._cache_id
        if (held is None or len(held) != len(current) or held[0] != current[0]
                or any(a is not b for a, b in zip(held[1:], current[1:]))):
            if len(k) != len(self.layers) or any(t.dtype not in (torch.float32, torch.bfloat16) or not t.is_contiguous()
                                                  for t in (*k, *v)):
                raise ValueError("the native decode step needs one contiguous fp32 or bf16 key and value buffer "
                                 "per layer")
            for i, s in enumerate(self.layers):
                s.kc, s.vc = k[i].data_ptr(), v[i].data_ptr()
                s.kv_fmt = BF16 if k[i].dtype == torch.bfloat16 else F32
            need = self.lib.fs_scratch_floats(self.layers, len(self.layers), self.head, B, C, t_max, nt)
            if self._scratch.numel() < need:
                self._scratch = torch.empty(need)
            self._cache_id = current
        return t_max, nt

    def greedy(self, k: list[torch.Tensor], v: list[torch.Tensor], key_mask: torch.Tensor | None,
               seq: torch.Tensor, T: int, pos0: torch.Tensor, min_new: int, eos: list[int], pad: int | None,
               done: list[bool]) -> int | None:
        """Greedy decoding of new tokens 1.. in one kernel call (``generate``'s loop, in C).

        ``seq`` (B, T + max_new) int64 holds the prompt and, in column ``T``, the first new token
        (chosen by the caller from the prompt's logits, which also filled the cache ``k``/``v``);
        ``pos0`` (B,) its positions; ``done`` the rows that already emitted an eos. Writes the
        new tokens into ``seq`` and returns how many new columns it holds, or ``None`` when the
        model's embeddings are not lookups the kernel can repeat (the caller's loop goes on).
        """
        runner = self.runner
        if runner.arch.tables is None or (pad is not None and pad < 0):
            return None
        keep: list[torch.Tensor] = []
        try:
            emb, dtype = embed_struct(*runner.arch.tables(runner.root), keep)
        except Unsupported:
            return None
        B, width = seq.shape
        C, max_new = emb.tok.k, width - T
        if max_new < 2 or not seq.is_contiguous() or seq.dtype != torch.long or C != self.head.k:
            return None
        t_max, nt = self._bind(k, v, B, C)
        pos0 = pos0.reshape(B).to(torch.long).contiguous()
        cos = sin = None
        if runner.arch.rope is not None:  # the model's own tables for every step, (max_new - 1, B, hd)
            positions = pos0[:, None] + torch.arange(max_new - 1)
            cos, sin = (t.to(torch.float32).transpose(0, 1).contiguous()
                        for t in runner.arch.rope(runner.root, torch.empty(B, max_new - 1, 1, dtype=dtype), positions))
            self._check_rope_width(cos.shape[-1])
        step, held = self._step(B, C, T, t_max, nt, None, None)
        if key_mask is not None:  # every column: the kernel reads keys 0..start of each step
            valid = key_mask.contiguous()
            held.append(valid)
            step.valid, step.valid_stride = valid.data_ptr(), valid.stride(0)
        eos_t = torch.tensor(eos or [0], dtype=torch.long)
        done_t = torch.tensor(done, dtype=torch.uint8)
        logits, x = self._logits(B), torch.empty(B, C)
        gen = Gen(T, max_new, min_new, len(eos), -1 if pad is None else pad, eos_t.data_ptr(), seq.data_ptr(),
                  done_t.data_ptr(), pos0.data_ptr(), cos.data_ptr() if cos is not None else None,
                  sin.data_ptr() if sin is not None else None, logits.data_ptr(), x.data_ptr())
        made = self.lib.fs_generate(self.layers, len(self.layers), self._final_p, self._head_p, ctypes.byref(emb),
                                    ctypes.byref(step), ctypes.byref(gen))
        check(made, "fs_generate", f"greedy loop, {B} rows from position {T}{self._tp_what()}")
        del keep, held
        return int(made)

    def _step(self, B: int, C: int, start: int, t_max: int, nt: int, key_mask: torch.Tensor | None,
              rope: tuple | None) -> tuple[Step, list]:
        """The per-call struct, and the tensors it points into (to be held until the call returns)."""
        step, keep = Step(B, C, start, t_max, nt, 0, None, None, None, self._scratch.data_ptr()), []
        if self.tp_group is not None:
            step.tp = self._exchange(B, C)
        if key_mask is not None:
            valid = key_mask[:, :start + 1]
            if not valid.is_contiguous():
                valid = valid.contiguous()
            keep.append(valid)
            step.valid, step.valid_stride = valid.data_ptr(), valid.stride(0)
        if rope is not None:
            cos, sin = (t.reshape(B, -1).to(torch.float32).contiguous() for t in rope)
            self._check_rope_width(cos.shape[-1])
            keep += [cos, sin]
            step.cos, step.sin = cos.data_ptr(), sin.data_ptr()
        return step, keep

    def _check_rope_width(self, width: int) -> None:
        """The model's rotary tables turn as many dims per head as the layers were built for."""
        want = self.layers[0].rot_dim if len(self.layers) else width
        if width != want:
            raise ValueError(f"the model's rotary tables are {width} wide, its layers rotate {want} dims per head "
                             "(the family's rotary_dim / partial_rotary_factor disagrees with its rotary module)")

    def _tp_what(self) -> str:
        """How a failed call's message names tensor parallelism's wait, if any."""
        if self._shm is None:
            return ""
        return f", tensor-parallel rank {self._shm.rank} of {self._shm.world} waiting up to {self._shm.timeout:.0f} s"

    def _exchange(self, B: int, C: int):
        """The tensor-parallel exchange's struct for ``B`` rows (the segment made, collectively, at
        the first step that needs one this large)."""
        need = B * max(C, self.head_per)
        if self._shm is None or self._shm.cap < need:
            self._shm = ShmAllReduce(self.lib, self.tp_group, need)
        self._shm.tp.vocab = self.n_vocab
        return ctypes.pointer(self._shm.tp)


_ESIZE = {F32: 4.0, BF16: 2.0, I8: 1.0, I4: 0.5}


def _row_slice(lin: Linear, r0: int, r1: int) -> Linear:
    """The struct of rows ``r0:r1`` of ``lin`` (pointers offset into the same memory)."""
    if lin.trans:
        raise Unsupported("a transposed (Conv1D) lm_head cannot be split by rows")
    out = Linear.from_buffer_copy(lin)
    out.n = r1 - r0
    out.w = lin.w + int(r0 * lin.k * _ESIZE[lin.fmt])
    if lin.fmt == I8:
        out.scales = lin.scales + r0 * 4
    elif lin.fmt == I4:
        out.scales = lin.scales + r0 * (lin.k // lin.group) * 4  # (n, K/group, 2) bf16
    if lin.bias:
        out.bias = lin.bias + r0 * (4 if lin.bias_fmt == F32 else 2)
    return out
