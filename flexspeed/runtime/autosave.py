"""Automatic resume, interval saves and retention: the ``checkpoint`` section's flexspeed extensions.

``"checkpoint": {"save_dir": "ckpt", "save_interval": 100, "keep_last": 3, "auto_resume": true,
"async_save": true}``:

- ``auto_resume``: ``initialize()`` loads the newest good tag of ``save_dir`` - the one ``latest``
  names, else (or when that one fails verification) the next newest complete ``global_step<N>`` tag,
  with a warning naming the tag skipped and why. No tag: training starts fresh (logged). Every
  load is the verified, transactional :func:`flexspeed.runtime.checkpoint_load.load_checkpoint`.
- ``save_interval``: after every that many optimizer steps the engine saves ``global_step<N>``.
- ``keep_last``: after a save commits, rank 0 removes the oldest ``global_step<N>`` tags beyond
  that number (never the one ``latest`` names; tags with other names are the user's and stay).
- ``async_save``: the save copies the state (the training stall) and a background thread writes,
  verifies and commits it on a process group of its own (collectives of two threads must not share
  one group). The next save, any explicit save or load, and the interpreter's exit wait for it; a
  failure is raised there. A kill mid-write leaves ``latest`` on the previous tag, as for any save.

Leftovers of killed saves (``.flexspeed-tmp-*`` directories, ``latest.flexspeed-tmp-<pid>`` files,
``.flexspeed-old-<tag>-<nonce>`` copies whose tag is complete) are removed at resume and before each save.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import threading
import time
import warnings
import weakref
from typing import Any

import torch.distributed as dist

from flexspeed.runtime.checkpoint import rank_world
from flexspeed.runtime.checkpoint_io import (
    MANIFEST,
    TMP_PREFIX,
    CheckpointError,
    read_latest,
    remove_stale_temporaries,
)
from flexspeed.utils.logging import ensure_handler

__all__ = ["AutoSaver", "build_autosaver", "wait_for_pending_saves", "newest_tags"]

_STEP_TAG = re.compile(r"global_step(\d+)")
_savers: weakref.WeakSet[AutoSaver] = weakref.WeakSet()


def _broadcast_from_0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (directory listings must agree even if a file system lags)."""
    rank, world = rank_world()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def newest_tags(save_dir: str) -> list[str]:
    """Complete tags of ``save_dir`` to resume from, best first: ``latest``'s, then ``global_step<N>`` by N down."""
    if not os.path.isdir(save_dir):
        return []
    tags = []
    try:
        first = read_latest(save_dir)
    except (CheckpointError, ValueError) as e:  # a damaged 'latest' must not stop a resume from the others
        warnings.warn(f"flexspeed: {e}; looking for the newest complete tag instead", stacklevel=2)
        first = None
    if first is not None:
        tags.append(first)
    steps = []
    for name in os.listdir(save_dir):
        m = _STEP_TAG.fullmatch(name)
        path = os.path.join(save_dir, name)
        if m and name != first and not os.path.islink(path) and os.path.isfile(os.path.join(path, MANIFEST)):
            steps.append((int(m.group(1)), name))
    return tags + [name for _, name in sorted(steps, reverse=True)]


def remove_leftovers(save_dir: str) -> None:
    """Rank 0: what killed saves left in ``save_dir`` (see :func:`checkpoint_io.remove_stale_temporaries`)."""
    if os.path.isdir(save_dir):
        remove_stale_temporaries(save_dir)


class AutoSaver:
    """The engine's interval saves, retention and asynchronous writer (one per engine)."""

    def __init__(self, *, save_dir: str, save_interval: int | None, keep_last: int | None, async_save: bool,
                 timeout: Any = None) -> None:
        self.save_dir = os.path.abspath(save_dir)
        self.save_interval = save_interval
        self.keep_last = keep_last
        self.async_save = async_save
        self._group = None
        if async_save and rank_world()[1] > 1:
            # collectives of the background writer run on a group of their own (every rank creates it here)
            kwargs = {"timeout": timeout} if timeout is not None else {}
            self._group = dist.new_group(backend="gloo", **kwargs)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending_tag = ""
        self._last_saved_step = -1
        self.stalls: list[float] = []  # seconds the training thread spent in each interval save
        _savers.add(self)

    def describe(self) -> str:
        keep = f", keeping the last {self.keep_last}" if self.keep_last else ""
        every = f"every {self.save_interval} steps" if self.save_interval else "only when asked"
        return f"{self.save_dir}, saving {every}{keep}{' asynchronously' if self.async_save else ''}"

    # ---- resume -------------------------------------------------------------------------------------------
    def resume(self, engine: Any) -> str | None:
        """Load the newest good tag of ``save_dir`` into ``engine``; returns its path, or None if there is none."""
        from flexspeed.runtime.checkpoint_load import load_checkpoint

        rank, _ = rank_world()
        if rank == 0:
            remove_leftovers(self.save_dir)
        candidates = _broadcast_from_0(newest_tags(self.save_dir) if rank == 0 else None)
        skipped: list[str] = []
        for tag in candidates:
            try:
                path, _ = load_checkpoint(engine, self.save_dir, tag)
            except (CheckpointError, ValueError) as e:  # every rank raised the same (the load agrees)
                skipped.append(tag)
                if rank == 0:
                    warnings.warn(f"flexspeed auto_resume: checkpoint tag {tag!r} in {self.save_dir} cannot be "
                                  f"loaded ({e}); trying the previous one", stacklevel=2)
                continue
            if skipped and rank == 0:
                warnings.warn(f"flexspeed auto_resume: resumed from {tag!r} (step {engine.global_steps}) instead of "
                              f"the newer {skipped}, which failed to load", stacklevel=2)
            self._last_saved_step = int(engine.global_steps)
            if rank == 0:
                ensure_handler().info("auto_resume: resumed from %s at step %d", path, engine.global_steps)
            return path
        if rank == 0:
            why = f" (every tag failed to load: {skipped})" if skipped else ""
            ensure_handler().info("auto_resume: no checkpoint in %s%s; starting from step 0", self.save_dir, why)
        return None

    # ---- saving -------------------------------------------------------------------------------------------
    def after_step(self, engine: Any) -> None:
        """Called by the engine after each optimizer step: save on the interval."""
        step = int(engine.global_steps)
        if self.save_interval and step % self.save_interval == 0 and step != self._last_saved_step:
            self.save(engine)

    def save(self, engine: Any) -> None:
        """Save ``global_step<N>`` now (waiting for the previous asynchronous save first)."""
        from flexspeed.runtime.checkpoint import prepare_save

        started = time.perf_counter()
        self.wait()
        job = prepare_save(engine, self.save_dir, None, copy_tensors=self.async_save)
        self._last_saved_step = int(engine.global_steps)
        if self.async_save:
            self._pending_tag = job.tag
            self._thread = threading.Thread(target=self._write, args=(job,), name="flexspeed-async-save",
                                            daemon=True)
            self._thread.start()
        else:
            self._write(job)
            self._raise_error()
        self.stalls.append(time.perf_counter() - started)

    def _write(self, job: Any) -> None:
        try:
            job.write(group=self._group)
            if job.rank == 0 and self.keep_last:
                self._retain(job.tag)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread at the next wait()
            self._error = e
            if self.async_save:
                ensure_handler().error("the asynchronous save of %s failed: %s", job.tag, e)

    def wait(self) -> None:
        """Block until the pending asynchronous save (if any) has committed; raise its error if it failed."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"saving checkpoint {self._pending_tag or 'global_step<N>'} into {self.save_dir} "
                                  f"failed: {type(error).__name__}: {error}") from error

    def _retain(self, newest: str) -> None:
        """Rank 0, after ``newest`` committed: remove ``global_step<N>`` tags beyond ``keep_last``."""
        keep = set()
        try:
            keep.add(read_latest(self.save_dir))
        except (CheckpointError, ValueError):
            pass
        steps = sorted(((int(m.group(1)), name) for name in os.listdir(self.save_dir)
                        if (m := _STEP_TAG.fullmatch(name)) and os.path.isdir(os.path.join(self.save_dir, name))
                        and not os.path.islink(os.path.join(self.save_dir, name))), reverse=True)
        keep |= {name for _, name in steps[: self.keep_last]} | {newest}
        for _, name in steps:
            if name not in keep:
                # renamed first (atomic), so a kill mid-delete leaves a hidden temporary, not a half tag
                doomed = os.path.join(self.save_dir, f"{TMP_PREFIX}removed-{name}-{os.getpid()}")
                os.rename(os.path.join(self.save_dir, name), doomed)
                shutil.rmtree(doomed, ignore_errors=True)


def build_autosaver(engine: Any, cfg: Any) -> AutoSaver | None:
    """The engine's ``AutoSaver`` from the config's ``checkpoint`` section (None without ``save_dir``); resumes."""
    section = cfg.checkpoint
    if section.save_dir is None:
        return None
    from flexspeed.distributed import group_timeout

    resolved = group_timeout()
    saver = AutoSaver(save_dir=section.save_dir, save_interval=section.save_interval, keep_last=section.keep_last,
                      async_save=section.async_save, timeout=resolved.value if resolved is not None else None)
    if section.auto_resume:
        saver.resume(engine)
    return saver


def wait_for_pending_saves() -> None:
    """Wait for every asynchronous save of this process (before an explicit save or load, and at exit)."""
    for saver in list(_savers):
        saver.wait()


@atexit.register
def _flush_at_exit() -> None:
    from flexspeed import distributed as fdist

    if fdist.crashed():
        return  # a crashing rank's peers may be gone: do not wait on a write that needs them
    for saver in list(_savers):
        try:
            saver.wait()
        except Exception as e:  # noqa: BLE001 - report, exit anyway
            ensure_handler().error("%s", e)
