"""Job processes' environment: threads per job and glibc's huge-page malloc tunable, reaching the processes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorascope import procenv

GLIBC = procenv._glibc_ok()


@pytest.mark.skipif(not GLIBC, reason="the tunable exists on glibc >= 2.35 only (musl, macOS: nothing to add)")
def test_tunable_is_added_once_kept_beside_others_and_can_be_refused():
    env = procenv.with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert procenv.with_hugepages(env) == env
    assert "GLIBC_TUNABLES" not in procenv.with_hugepages({"LORASCOPE_HUGEPAGES": "0"})
    job = procenv.job_env(3, {"PATH": "/bin"})
    assert job["LORASCOPE_THREADS"] == job["OMP_NUM_THREADS"] == "3" and "hugetlb=1" in job["GLIBC_TUNABLES"]


@pytest.mark.skipif(not GLIBC, reason="the tunable exists on glibc >= 2.35 only")
def test_a_process_reexecutes_itself_once_with_the_tunable():
    probe = ("import os, sys; from lorascope.procenv import reexec_with_hugepages; print(os.getpid()); "
             "sys.argv[0] = 'typed-command'; "
             "reexec_with_hugepages(['-c', 'import os, sys; from lorascope.procenv import restore_argv0; "
             "restore_argv0(); print(os.getpid(), os.environ[\"GLIBC_TUNABLES\"], sys.argv[0], "
             "\"LORASCOPE_ARGV0\" in os.environ)'])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LORASCOPE_HUGEPAGES")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    first, second = out.stdout.split("\n")[:2]
    # same process (exec), now with the tunable, and the command as typed (for the provenance)
    assert second.split() == [first, "glibc.malloc.hugetlb=1", "typed-command", "False"]
    again = subprocess.run([sys.executable, "-c", probe], env={**env, "LORASCOPE_HUGEPAGES": "0"},
                           capture_output=True, text=True, check=True)
    assert again.stdout.split() == [again.stdout.split()[0]]  # opted out: no re-exec
