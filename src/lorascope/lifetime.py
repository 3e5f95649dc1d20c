"""Process lifetime: a child that dies with its parent (Linux PR_SET_PDEATHSIG).

    subprocess.Popen(cmd, preexec_fn=die_with_parent)

A killed study must not leave orphan jobs, workers or training ranks writing into the directory that a re-run is
now using; the kernel sends SIGKILL to the child the moment its parent dies, whatever killed the parent.
"""

from __future__ import annotations

import signal


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: orphans are then possible, and a re-run's lock check is the remaining guard
