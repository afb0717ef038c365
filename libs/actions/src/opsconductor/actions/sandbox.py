"""The sandbox a ``shell`` step runs in (docs/security.md, "The action sandbox").

Two ways to build it, chosen by the operator (``OPSC_SANDBOX_MODE``), never by falling back:

* ``bwrap`` (default): Debian's bubblewrap puts the step in new PID, network, IPC, UTS and
  cgroup namespaces, with a ``/proc`` of its own processes only, a minimal ``/dev``, the system
  directories (``ro_paths``) read-only and an empty ``/tmp``: nothing else of the worker's file
  system exists in there (its working directory, ``.devstack/``, key files, mounted secrets).
  Inside, ``prlimit`` sets the resource limits and ``setpriv`` switches to the step's own uid
  with no groups, no capabilities and ``no_new_privs``. Needs root or user namespaces.
* ``setpriv``: the same uid switch and limits without namespaces, for clusters that forbid
  them (Kubernetes pods usually do). The step then sees the file system as any unprivileged
  user does (file permissions protect the worker's files) and shares the worker's network, so
  it runs only for tenants whose policy allows the network: ``network: false`` cannot be kept
  there, and the step fails rather than run with more than its policy grants.

Every step gets a uid of its own from ``uid_base .. uid_base + uid_count - 1``, held with a lock
file so that concurrent worker processes of a host never share one: the process limit counts per
uid, and one step cannot signal, trace or read another. When the step ends, every process of
that uid is killed (``kill -KILL -1`` run *as* that uid through ``setpriv``, which a non-root
worker can do too), so nothing it started outlives it, inside its process group or not. In
setpriv mode the files it left in the shared scratch directories (``scratch_paths``: ``/tmp``,
``/var/tmp``, ``/dev/shm``) are deleted too, also as that uid, so the next step given the same
uid (perhaps another tenant's) finds nothing of it.

Whatever prevents building the sandbox (a missing tool, no free uid, a network the mode cannot
isolate) raises `SandboxUnavailableError`: the step fails; it never runs unsandboxed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import structlog
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from opsconductor.actions.base import ActionFailedError
from opsconductor.common.tenant_policy import ShellPolicy

__all__ = [
    "SANDBOX_TMP",
    "Sandbox",
    "SandboxMode",
    "SandboxSettings",
    "SandboxUnavailableError",
    "SandboxedCommand",
]

log = structlog.get_logger(__name__)

#: The step's scratch directory in bwrap mode (a private tmpfs) and its default cwd.
SANDBOX_TMP = "/tmp"  # noqa: S108 - inside the sandbox: a tmpfs of the step's own
_DEFAULT_RO_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: How long processes of a finished step may take to disappear after SIGKILL.
_REAP_WAIT_S = 5.0
_POLL_S = 0.02


class SandboxMode(StrEnum):
    BWRAP = "bwrap"
    SETPRIV = "setpriv"


class SandboxSettings(BaseSettings):
    """How steps are sandboxed on this worker, from ``OPSC_SANDBOX_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="OPSC_SANDBOX_", frozen=True, extra="ignore")

    mode: SandboxMode = SandboxMode.BWRAP
    #: First uid (and gid) of the range steps run as; none of them may own anything.
    uid_base: int = Field(default=200_000, ge=1000, le=2**31 - 70_000)
    uid_count: int = Field(default=1000, ge=1, le=65_536)
    #: Host directories visible (read-only) inside a bwrap sandbox; symlinks are recreated.
    ro_paths: tuple[str, ...] = _DEFAULT_RO_PATHS
    #: Size of the step's private ``/tmp`` in bwrap mode.
    tmp_mb: int = Field(default=64, ge=1, le=65_536)
    #: Where the uid lock files live (created 0700; must belong to the worker's uid).
    lock_dir: Path = Path(tempfile.gettempdir()) / "opsconductor-sandbox"
    #: setpriv mode: world-writable directories cleaned of the step's files after it.
    scratch_paths: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm")  # noqa: S108
    bwrap: str = "bwrap"
    setpriv: str = "setpriv"
    prlimit: str = "prlimit"
    kill: str = "kill"
    find: str = "find"


class SandboxUnavailableError(ActionFailedError):
    """The step's sandbox could not be set up, so the step did not run."""

    reason = "SANDBOX_UNAVAILABLE"


def _cannot_start(what: str, why: str) -> ActionFailedError:
    return ActionFailedError(f"could not start {what}: {why}", error_class="FileNotFoundError")


@dataclass(frozen=True)
class SandboxedCommand:
    """What to execute for a step: the wrapped argv, the host cwd, the step's uid."""

    argv: list[str]
    cwd: str
    uid: int


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SandboxUnavailableError(
            f"the sandbox tool {name!r} is not installed on this worker", tool=name
        )
    return found


class _UidPool:
    """Hands out uids of a range, each held by an exclusive ``flock`` until released."""

    def __init__(self, base: int, count: int, lock_dir: Path) -> None:
        self._base, self._count, self._dir = base, count, lock_dir
        self._held: dict[int, int] = {}
        self._next = 0

    def _checked_dir(self) -> Path:
        with contextlib.suppress(FileExistsError):
            self._dir.mkdir(mode=0o700, parents=True)
        info = self._dir.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise SandboxUnavailableError(
                "the sandbox lock directory is not a private directory of the worker"
            )
        return self._dir

    def acquire(self) -> int:
        folder = self._checked_dir()
        for offset in range(self._count):
            uid = self._base + (self._next + offset) % self._count
            if uid in self._held:
                continue
            fd = os.open(folder / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # another worker process on this host holds it
                continue
            self._held[uid] = fd
            self._next = (uid - self._base + 1) % self._count
            return uid
        raise SandboxUnavailableError(
            f"all {self._count} sandbox uids are in use; try again when steps finish"
        )

    def release(self, uid: int) -> None:
        fd = self._held.pop(uid)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _live_processes_of(uid: int) -> list[int]:
    """Pids of live (not zombie) processes whose real uid is ``uid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)] and fields.get("State", "").split()[
            :1
        ] not in (["Z"], ["X"]):
            found.append(int(entry.name))
    return found


async def _run_as(uid: int, setpriv: str, *argv: str) -> None:
    """Run ``argv`` as ``uid`` (no groups) and wait for it; its output and status are ignored."""
    process = await asyncio.create_subprocess_exec(
        setpriv,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--",
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await process.wait()


class Sandbox:
    """Builds the sandboxed command of each step and cleans up after it."""

    def __init__(self, settings: SandboxSettings | None = None) -> None:
        self.settings = settings or SandboxSettings()
        self._uids = _UidPool(
            self.settings.uid_base, self.settings.uid_count, self.settings.lock_dir
        )

    @contextlib.asynccontextmanager
    async def enter(
        self, argv: Sequence[str], *, cwd: str | None, policy: ShellPolicy
    ) -> AsyncIterator[SandboxedCommand]:
        """A uid and the wrapped command for one step; on exit nothing of that uid runs.

        Raises `SandboxUnavailableError` when the sandbox cannot be built, and
        `ActionFailedError` (``error_class`` ``FileNotFoundError``) when the program or
        ``cwd`` does not exist where the step would see it.
        """
        settings = self.settings
        if settings.mode is SandboxMode.SETPRIV and not policy.network:
            raise SandboxUnavailableError(
                "this worker's sandbox (setpriv) cannot isolate the network and the tenant "
                "policy does not allow it (policy shell.network)"
            )
        tools = [_tool(settings.setpriv), _tool(settings.prlimit), _tool(settings.kill)]
        tools.append(
            _tool(settings.bwrap) if settings.mode is SandboxMode.BWRAP else _tool(settings.find)
        )
        self._check_visible(argv[0], directory=False)
        if cwd is not None:
            self._check_visible(cwd, directory=True)
        uid = self._uids.acquire()
        try:
            command = self._command(uid, argv, cwd, policy, tools)
            log.debug("sandbox_entered", mode=settings.mode.value, uid=uid)
            yield command
        finally:
            try:
                await asyncio.shield(self._clean_up(uid, tools))
            finally:
                self._uids.release(uid)

    async def _clean_up(self, uid: int, tools: list[str]) -> None:
        await self.kill_all(uid, tools[0], tools[2])
        roots = self._scratch_roots()
        if self.settings.mode is SandboxMode.SETPRIV and roots:  # no roots: find would use "."
            # As the uid: it can delete exactly what it could create, nothing of anyone else.
            await _run_as(uid, tools[0], tools[3], *roots, "-xdev", "-user", str(uid), "-delete")

    def _scratch_roots(self) -> list[str]:
        return [path for path in self.settings.scratch_paths if os.path.isdir(path)]

    def _check_visible(self, path: str, *, directory: bool) -> None:
        """Fail like a missing file when ``path`` does not exist inside the sandbox."""
        kind = "directory" if directory else "program"
        if not os.path.isabs(path):
            raise _cannot_start(path, f"the {kind} must be an absolute path")
        if self.settings.mode is SandboxMode.BWRAP and not self._bound(path):
            raise _cannot_start(path, f"the {kind} is not visible inside the sandbox")
        exists = os.path.isdir(path) if directory else os.path.isfile(path)
        if not exists:
            raise _cannot_start(path, "No such file or directory")

    def _bound(self, path: str) -> bool:
        real = os.path.realpath(path)
        if real == SANDBOX_TMP or real.startswith(SANDBOX_TMP + "/"):
            # The step's private /tmp: only the directory itself exists at start.
            return real == SANDBOX_TMP
        roots = [os.path.realpath(p) for p in self.settings.ro_paths if os.path.exists(p)]
        return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)

    def _command(
        self,
        uid: int,
        argv: Sequence[str],
        cwd: str | None,
        policy: ShellPolicy,
        tools: list[str],
    ) -> SandboxedCommand:
        setpriv, prlimit, bwrap = tools[0], tools[1], tools[3]
        limits = [
            prlimit,
            f"--cpu={policy.cpu_s}:{policy.cpu_s + 1}",
            f"--as={policy.memory_bytes}",
            f"--nproc={policy.max_processes}",
            f"--fsize={policy.max_file_bytes}",
            f"--nofile={policy.max_open_files}",
            "--core=0",
            "--",
        ]
        switch = [
            setpriv,
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
        ]
        if self.settings.mode is SandboxMode.SETPRIV:
            return SandboxedCommand([*limits, *switch, *argv], cwd or SANDBOX_TMP, uid)
        return SandboxedCommand(
            [*self._bwrap(bwrap, cwd, policy), *limits, *switch, *argv], "/", uid
        )

    def _bwrap(self, bwrap: str, cwd: str | None, policy: ShellPolicy) -> list[str]:
        args = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc"]
        args += ["--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
        if not policy.network:
            args.append("--unshare-net")
        for path in self.settings.ro_paths:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--perms", "1777", "--size", str(self.settings.tmp_mb * 1024 * 1024)]
        args += ["--tmpfs", SANDBOX_TMP, "--chdir", cwd or SANDBOX_TMP]
        # Root keeps only what setpriv needs to switch uid; the uid switch then clears them.
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        return [*args, "--"]

    async def kill_all(self, uid: int, setpriv: str, kill: str) -> None:
        """SIGKILL every process of ``uid`` (as that uid) until none is left, bounded."""
        deadline = time.monotonic() + _REAP_WAIT_S
        while _live_processes_of(uid):
            await _run_as(uid, setpriv, kill, "-KILL", "-1")
            if time.monotonic() >= deadline:  # pragma: no cover - a process stuck in D state
                log.error("sandbox_processes_survived", uid=uid)
                return
            await asyncio.sleep(_POLL_S)
