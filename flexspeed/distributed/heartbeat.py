"""A heartbeat over the rendezvous store, so that a hang names the rank that stopped answering.

Each rank runs one daemon thread that publishes in the store (the TCPStore the process group
rendezvoused on, through a connection of its own with a short timeout) a beat counter and what the
rank is doing ("forward step 12", "save_checkpoint tag X"; set with :func:`note`): every
``interval`` seconds, and soon after each change. When a collective fails (the process-group
timeout, a closed connection), the process's exception hook (installed by ``init_distributed``)
reads every rank's record twice, ``2 * interval`` apart: a peer whose counter did not move has
stopped (SIGSTOP, a dead host, a frozen process) or died; a peer that still beats but whose activity
count lags is alive but did not reach the collective; a peer that published a failure failed first.
The sentence is printed after the traceback on every live rank and written into torchelastic's
error file, so that ``flexspeed launch``'s summary names the culprit too. Nothing here interrupts
training: the timeout itself is the process group's (see :mod:`flexspeed.distributed.timeout`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

__all__ = ["note", "current_activity", "start_heartbeat", "stop_heartbeat", "diagnose", "report_failure",
           "DIAGNOSIS_MARK"]

DIAGNOSIS_MARK = "flexspeed diagnosis:"
_activity: list[Any] = ["started", 0]  # [text, count]; replaced whole so a reader never sees a torn pair
_lock = threading.Lock()
_current: Heartbeat | None = None
_started = 0


def note(activity: str) -> None:
    """Record what this rank does now (published with the next heartbeat). Cheap: no I/O."""
    global _activity
    _activity = [activity, _activity[1] + 1]
    hb = _current
    if hb is not None:
        hb.wake.set()  # publish soon (the thread rate-limits), so a hang right after shows this activity


def current_activity() -> str:
    return str(_activity[0])


@dataclass
class _Peer:
    beat: int = -1
    activity: str = "(no heartbeat yet)"
    count: int = 0
    state: str = "running"  # running | exited | failed
    detail: str = ""
    pid: int = 0
    host: str = ""
    time: float = 0.0  # the peer's wall clock at its last record


def _tcp_store_address() -> tuple[str, int] | None:
    """Host and port of the TCPStore behind the default process group, if it is one."""
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no group, or a private API that moved
        return None
    for _ in range(8):
        if isinstance(store, dist.TCPStore):
            return store.host, int(store.port)
        store = getattr(store, "underlying_store", None)
        if store is None:
            return None
    return None


class Heartbeat(threading.Thread):
    """The publishing thread of one rank, and the diagnosis that reads everyone's records.

    Publishing costs one store ``set`` per beat: every ``interval`` seconds, and at most four times a
    second after :func:`note`. Peers' records are read only every ``read_every`` seconds (a cache for
    when the store host itself stops) and when a failure is diagnosed: then twice, ``2 * interval``
    apart, to see whose beat still moves.
    """

    def __init__(self, *, rank: int, world_size: int, address: tuple[str, int], prefix: str, interval: float,
                 store_host: str) -> None:
        super().__init__(name="flexspeed-heartbeat", daemon=True)
        self.rank, self.world_size, self.address, self.prefix = rank, world_size, address, prefix
        self.interval = interval
        self.read_every = max(5.0, interval * world_size / 8)  # keeps the store's load flat as jobs grow
        self.store_host = store_host  # "rank 0" or "the launcher": who dies with the store
        self.peers = {r: _Peer() for r in range(world_size) if r != rank}
        self.beat = 0
        self.store_error = ""
        self.store_down_since: float | None = None
        self._all_present = False
        self._halt = threading.Event()
        self.wake = threading.Event()
        self._store: Any = None

    # ---- the thread ---------------------------------------------------------------------------------------
    def run(self) -> None:
        last_beat = last_read = 0.0
        while not self._halt.is_set():
            self.wake.clear()
            wait = 0.25 - (time.monotonic() - last_beat)
            if wait > 0:  # at most four records a second, however often note() is called
                self._halt.wait(wait)
            self._publish("running", "")
            last_beat = time.monotonic()
            if last_beat - last_read >= self.read_every:
                self._read()
                last_read = time.monotonic()
            self.wake.wait(self.interval)

    def _connect(self) -> Any:
        import torch.distributed as dist

        if self._store is None:
            timeout = timedelta(seconds=max(2.0, min(10.0, 2 * self.interval)))
            self._store = dist.PrefixStore(self.prefix, dist.TCPStore(
                self.address[0], self.address[1], is_master=False, timeout=timeout, wait_for_workers=False))
        return self._store

    def _failed_store(self, e: Exception) -> None:
        self._store = None
        if self.store_down_since is None:
            self.store_down_since = time.monotonic()
        self.store_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def _publish(self, state: str, detail: str, *, reconnect: bool = True) -> None:
        text, count = _activity
        self.beat += 1
        record = {"beat": self.beat, "activity": text, "count": count, "state": state, "detail": detail[:2000],
                  "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        if self._store is None and not reconnect:
            return
        try:
            self._connect().set(str(self.rank), json.dumps(record))
            self.store_down_since, self.store_error = None, ""
        except Exception as e:  # noqa: BLE001 - the store host may be the stopped process
            self._failed_store(e)

    def _read(self) -> bool:
        """Refresh every peer's record from the store; False if the store did not answer."""
        try:
            store = self._connect()
            keys = [str(r) for r in self.peers]
            if not self._all_present:
                keys = [k for k in keys if store.check([k])]
                self._all_present = len(keys) == len(self.peers)
            for key, raw in zip(keys, store.multi_get(keys) if keys else []):
                rec = json.loads(bytes(raw).decode())
                peer = self.peers[int(key)]
                peer.beat, peer.activity, peer.count = int(rec["beat"]), str(rec["activity"]), int(rec["count"])
                peer.state, peer.detail = str(rec.get("state", "running")), str(rec.get("detail", ""))
                peer.pid, peer.host, peer.time = int(rec.get("pid", 0)), str(rec.get("host", "")), \
                    float(rec.get("time", 0.0))
            return True
        except Exception as e:  # noqa: BLE001
            self._failed_store(e)
            return False

    def finish(self, state: str, detail: str = "") -> None:
        """Stop the thread; publish a last record saying how this rank ended (exited or failed)."""
        self._halt.set()
        self.wake.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2)
        self._publish(state, detail, reconnect=False)  # no new connection: the store may be gone already

    # ---- the diagnosis ------------------------------------------------------------------------------------
    def diagnose(self, *, connection_closed: bool = False) -> str | None:
        """One sentence naming the rank(s) that stopped answering, died or lag behind, or None if all look fine.

        Takes about ``2 * interval`` seconds: it reads every record twice to see whose beat still moves.
        """
        me = f"this rank ({self.rank}) was at {current_activity()!r}"
        self._publish("running", "")
        if not self._read():
            host = self.store_host
            last = self.peers.get(0)
            blame = (f"rank 0 stopped answering with it; rank 0's last activity was {last.activity!r}"
                     if host == "rank 0" and last is not None else "it may have stopped")
            return (f"the rendezvous store at {self.address[0]}:{self.address[1]}, hosted by {host}, does not answer "
                    f"({self.store_error}): {blame}; {me}")
        failed = [(r, p) for r, p in self.peers.items() if p.state == "failed"]
        if failed:
            r, p = failed[0]
            return (f"rank {r} failed first ({p.detail or 'an exception'}); its last activity was {p.activity!r}; "
                    f"{me}")
        before = {r: p.beat for r, p in self.peers.items()}
        time.sleep(2 * self.interval + 0.5)
        self._publish("running", "")
        self._read()
        now = time.time()
        stopped = [(r, p) for r, p in self.peers.items() if p.state == "running" and p.beat == before[r]]
        if stopped:
            how = "died or stopped (its connection closed and its heartbeat stopped" if connection_closed else \
                "stopped answering (no heartbeat"
            parts = [f"rank {r} {how} for {max(0.0, now - p.time):.0f} s; pid {p.pid or '?'} on {p.host or '?'}); "
                     f"its last activity was {p.activity!r}" for r, p in stopped]
            return "; ".join(parts) + f"; {me}"
        mine = _activity[1]
        behind = [(r, p) for r, p in self.peers.items() if p.state == "running" and p.count < mine]
        if behind:
            parts = [f"rank {r} is alive (its heartbeat goes on) but did not reach the collective this rank waits "
                     f"in: its last activity was {p.activity!r}" for r, p in behind]
            return "; ".join(parts) + f"; {me}"
        exited = [r for r, p in self.peers.items() if p.state == "exited"]
        if exited:
            return f"rank(s) {exited} already exited normally; {me}"
        return None


def start_heartbeat(interval: float) -> Heartbeat | None:
    """Start (or keep) this process's heartbeat for the current default process group; None if not applicable."""
    global _current, _started
    import torch.distributed as dist

    if interval <= 0 or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    address = _tcp_store_address()
    if address is None:
        return None
    with _lock:
        if _current is not None and _current.is_alive() and _current.address == address:
            return _current
        if _current is not None:
            _current.finish("exited")
        _started += 1
        prefix = f"flexspeed-heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_started}"
        host = "the launcher" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0"
        _current = Heartbeat(rank=dist.get_rank(), world_size=dist.get_world_size(), address=address,
                             prefix=prefix, interval=float(interval), store_host=host)
        _current._publish("running", "")  # publish before the first collective, so peers see this rank
        _current.start()
        return _current


def stop_heartbeat(state: str = "exited", detail: str = "") -> None:
    global _current
    with _lock:
        hb, _current = _current, None
    if hb is not None:
        hb.finish(state, detail)


def diagnose() -> str | None:
    hb = _current
    return hb.diagnose() if hb is not None else None


_DIST_FAILURE_WORDS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                       "gloo", "nccl", "socket", "peer")


def _is_distributed_failure(exc: BaseException) -> bool:
    name = type(exc).__name__
    if name in ("DistBackendError", "DistNetworkError", "DistStoreError", "DistError"):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in _DIST_FAILURE_WORDS)


def report_failure(exc: BaseException) -> str | None:
    """After an uncaught exception: publish it, and for a collective failure print who is to blame.

    Returns the diagnosis printed (also written to torchelastic's error file), or None.
    """
    hb = _current
    if hb is None:
        return None
    message = None
    if _is_distributed_failure(exc):
        text = str(exc).lower()
        found = hb.diagnose(connection_closed=any(w in text for w in ("reset", "closed", "broken pipe")))
        if found:
            first = str(exc).splitlines()[0] if str(exc) else ""
            message = f"{DIAGNOSIS_MARK} rank {hb.rank}: {type(exc).__name__} ({first[:300]}) - {found}"
            print(message, file=sys.stderr, flush=True)
            _write_error_file(message)
    stop_heartbeat("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
    return message


def _write_error_file(message: str) -> None:
    """torchelastic's per-worker error file (``TORCHELASTIC_ERROR_FILE``), read into the launcher's summary."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                          "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass
