"""The opt-in DeepSpeed identity of one process (and of the processes it starts).

``activate()`` makes ``import deepspeed`` (and ``deepspeed.<sub>.<module>``) resolve to flexspeed's
compatibility layer in this process, and makes ``importlib.metadata`` report a ``deepspeed``
distribution whose version, ``0.19.8+flexspeed.<flexspeed version>``, satisfies the version checks
of transformers, accelerate and Lightning (``>=0.9.3``, ``>=0.14.4``, ``>=0.16.0``; DeepSpeed 0.19.8 is
the release whose behaviour flexspeed follows). The ``+flexspeed`` local label says what it is.

How, without installing anything: a fresh temporary folder holds a ``deepspeed`` package of one line
(it installs :class:`DeepSpeedAliasFinder` and hands over to the compatibility layer) and a
``deepspeed-<version>.dist-info`` with the metadata. The folder goes first on ``sys.path`` here and on
``PYTHONPATH`` for child processes (torchrun's workers, dataloader workers), so their ``import
deepspeed`` finds it first; it is removed when the process that made it exits. A folder whose maker
was killed (SIGKILL: no exit handler ran) is removed by the next ``activate()`` of the same user: each
folder names its maker (``owner``: pid and start time), and one whose maker is gone is stale. Processes
started without it - and every process outside such a run - see whatever ``deepspeed`` is installed,
unchanged.

Module mapping: ``deepspeed`` is :mod:`flexspeed.integrations.deepspeed`; ``deepspeed.a.b`` is
``flexspeed.integrations.deepspeed.a.b`` where the compatibility layer has that module (where
DeepSpeed's layout differs from flexspeed's), else ``flexspeed.a.b``. An alias is the same module
object under both names (classes keep one identity).
"""

from __future__ import annotations

import atexit
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import stat
import sys
import tempfile
from types import ModuleType

__all__ = ["DEEPSPEED_BASE_VERSION", "ENV_VAR", "distribution_version", "activate", "is_active",
           "DeepSpeedAliasFinder", "write_identity_dir", "remove_stale_identity_dirs"]

DEEPSPEED_BASE_VERSION = "0.19.8"
ENV_VAR = "FLEXSPEED_AS_DEEPSPEED"  # the identity folder of this run; children reuse it
_COMPAT = "flexspeed.integrations.deepspeed"
_PREFIX = "flexspeed-as-deepspeed-"
_OWNER = "owner"  # "<pid> <start time>" of the process that made the folder
_BOOTSTRAP = ("# written by flexspeed (python -m flexspeed.as_deepspeed): `import deepspeed` is flexspeed's\n"
              "# DeepSpeed compatibility layer in this process; see flexspeed/integrations/identity.py\n"
              "from flexspeed.integrations.identity import _become_deepspeed\n"
              "_become_deepspeed()\n")


def distribution_version() -> str:
    """The ``deepspeed`` version this identity reports, e.g. ``0.19.8+flexspeed.0.1.0``."""
    import flexspeed

    return f"{DEEPSPEED_BASE_VERSION}+flexspeed.{flexspeed.__version__}"


def alias_target(fullname: str) -> str | None:
    """The flexspeed module that plays DeepSpeed module ``fullname`` (None: none does)."""
    if fullname == "deepspeed":
        return _COMPAT
    rest = fullname[len("deepspeed"):]
    compat = _COMPAT + rest
    try:
        if importlib.util.find_spec(compat) is not None:
            return compat
    except ImportError:  # a parent is not a package of the compatibility layer
        pass
    plain = "flexspeed" + rest
    try:
        return plain if importlib.util.find_spec(plain) is not None else None
    except ImportError:
        return None


class _AliasLoader(importlib.abc.Loader):
    """Loads ``deepspeed.x`` as the already-importable flexspeed module (the same object)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import machinery stamped the alias spec on the module: give it its own back
        if self._spec is not None:
            module.__spec__ = self._spec


class DeepSpeedAliasFinder(importlib.abc.MetaPathFinder):
    """``sys.meta_path`` entry resolving ``deepspeed`` and ``deepspeed.*`` to flexspeed's modules."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001 - importlib's protocol
        if fullname != "deepspeed" and not fullname.startswith("deepspeed."):
            return None
        real = alias_target(fullname)
        if real is None:
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: this process runs with flexspeed's DeepSpeed identity "
                "(--as-deepspeed), whose compatibility layer has no such module (docs/integrations.md lists what "
                "it provides). Fix: avoid that DeepSpeed feature, or run without --as-deepspeed with DeepSpeed "
                "installed", name=fullname)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real), origin=f"flexspeed alias of {real}")


def _install_finder() -> None:
    if not any(isinstance(f, DeepSpeedAliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, DeepSpeedAliasFinder())


def _become_deepspeed() -> None:
    """Run by the one-line ``deepspeed`` package in the identity folder: hand ``deepspeed`` over."""
    _install_finder()
    sys.modules["deepspeed"] = importlib.import_module(_COMPAT)


def write_identity_dir(parent: str | None = None) -> str:
    """A new folder holding the bootstrap ``deepspeed`` package and the distribution metadata."""
    root = tempfile.mkdtemp(prefix=_PREFIX, dir=parent)
    with open(os.path.join(root, _OWNER), "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {_start_time(os.getpid())}\n")
    version = distribution_version()
    os.makedirs(os.path.join(root, "deepspeed"))
    with open(os.path.join(root, "deepspeed", "__init__.py"), "w", encoding="utf-8") as f:
        f.write(_BOOTSTRAP)
    info = os.path.join(root, f"deepspeed-{version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w", encoding="utf-8") as f:
        f.write("Metadata-Version: 2.1\nName: deepspeed\n"
                f"Version: {version}\n"
                "Summary: flexspeed's DeepSpeed identity for this process (not DeepSpeed): import deepspeed runs "
                "flexspeed on PyTorch's distributed stack\n"
                "Author: flexspeed\n")
    with open(os.path.join(info, "top_level.txt"), "w", encoding="utf-8") as f:
        f.write("deepspeed\n")
    with open(os.path.join(info, "INSTALLER"), "w", encoding="utf-8") as f:
        f.write("flexspeed-as-deepspeed\n")
    return root


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot, Linux), ``"?"`` where unknown: with the pid it
    tells a live maker from a later process that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _maker_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process has that pid
        return True
    return start == "?" or _start_time(pid) in (start, "?")


def remove_stale_identity_dirs(parent: str | None = None) -> list[str]:
    """Remove this user's identity folders in ``parent`` (default: the temp folder) whose maker is gone.

    A folder is removed only when it is a real directory (no symlink) owned by this user, named like one,
    and its ``owner`` file names a pid that is not running (or now runs a process started later). Folders
    without a readable ``owner`` file are left alone. Returns the removed paths.
    """
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            owner_file = os.path.join(path, _OWNER)
            if os.path.islink(owner_file):
                continue
            with open(owner_file, encoding="utf-8") as f:
                pid_text, start = (f.read().split() + ["?"])[:2]
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _maker_alive(pid, start):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def is_active() -> bool:
    """Whether this process runs with the DeepSpeed identity."""
    return any(isinstance(f, DeepSpeedAliasFinder) for f in sys.meta_path)


def activate() -> str:
    """Give this process, and the processes it starts, the DeepSpeed identity; returns the identity folder.

    Idempotent. Inside a process started with the identity (``FLEXSPEED_AS_DEEPSPEED`` names an existing
    folder) it reuses that folder; otherwise it makes one and removes it when this process exits.
    A ``deepspeed`` module imported before this call is replaced for later imports only: call it first.
    """
    root = os.environ.get(ENV_VAR)
    if not root or not os.path.isdir(os.path.join(root, "deepspeed")):
        remove_stale_identity_dirs()  # left by makers killed with SIGKILL
        root = write_identity_dir()
        atexit.register(shutil.rmtree, root, True)
        os.environ[ENV_VAR] = root
    if root not in sys.path:
        sys.path.insert(0, root)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])
    for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
        if not getattr(sys.modules[name], "__name__", "").startswith("flexspeed"):
            del sys.modules[name]  # a real DeepSpeed imported earlier: later imports get flexspeed
    importlib.invalidate_caches()
    _install_finder()
    return root
