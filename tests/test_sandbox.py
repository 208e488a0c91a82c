"""Containment of generated programs: a verdict they cannot forge, no way out of the sandbox."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from evals import execution
from evals.execution import run_program
from evals.metrics import humaneval_passed

PROBLEM = {
    "task_id": "Toy/1",
    "prompt": "def mul(a, b):\n    \"\"\"Product of a and b.\"\"\"\n",
    "canonical_solution": "    return a * b\n",
    "test": ("def check(candidate):\n    assert candidate(3, 4) == 12\n"
             "    assert candidate(0, 5) == 0\n"),
    "entry_point": "mul",
}
WRONG = "    return a + b\n\n"


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "true"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.fixture(params=["namespaces", "basic"])
def mode(request, monkeypatch):
    """Both containment modes; the namespace one wherever ``unshare`` works on this host."""
    if request.param == "namespaces":
        if not _unshare_works():
            pytest.skip("unshare cannot create namespaces on this host")
        assert execution.isolation_mode() == "namespaces"
    monkeypatch.setattr(execution, "_mode", request.param)
    return request.param


@pytest.fixture
def namespaces(monkeypatch):
    if not _unshare_works():
        pytest.skip("unshare cannot create namespaces on this host")
    assert execution.isolation_mode() == "namespaces"
    monkeypatch.setattr(execution, "_mode", "namespaces")


@pytest.fixture
def sigterm_received(monkeypatch):
    """A list that gets an entry if this test process receives SIGTERM."""
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGTERM, previous)


def test_correct_passes_wrong_fails(mode):
    assert humaneval_passed(PROBLEM["canonical_solution"], PROBLEM)
    assert not humaneval_passed(WRONG, PROBLEM)


def test_an_infinite_loop_times_out(mode):
    result = run_program("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout" and not result.passed


def test_system_exit_after_a_wrong_solution_fails(mode):
    assert not humaneval_passed(WRONG + "raise SystemExit(17)\n", PROBLEM)


def test_posix_exit_after_a_wrong_solution_fails(mode):
    assert not humaneval_passed(WRONG + "import posix\nposix._exit(17)\n", PROBLEM)


def test_killing_the_parent_neither_reaches_it_nor_passes(mode, sigterm_received):
    code = WRONG + "import os, posix, signal\nposix.kill(os.getppid(), signal.SIGTERM)\n"
    assert not humaneval_passed(code, PROBLEM)
    time.sleep(0.2)
    assert sigterm_received == []


def test_killing_the_parents_group_neither_reaches_it_nor_passes(mode, sigterm_received):
    code = WRONG + ("import os, posix, signal\n"
                    "posix.killpg(os.getpgid(os.getppid()), signal.SIGTERM)\n")
    assert not humaneval_passed(code, PROBLEM)
    time.sleep(0.2)
    assert sigterm_received == []


def _pids_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def test_a_detached_sleeper_neither_stalls_the_run_nor_outlives_it(namespaces):
    marker = f"specdec-sleeper-{secrets.token_hex(8)}"
    program = ("import posix, sys, time\n"
               "if posix.fork() == 0:\n"
               "    posix.setsid()\n"
               "    posix.execv(sys.executable, [sys.executable, '-c', "
               f"'import time; time.sleep(1000)', {marker!r}])\n"
               "time.sleep(1000)\n")
    results = []
    runner = threading.Thread(target=lambda: results.append(run_program(program, timeout=2.0)),
                              daemon=True)
    runner.start()
    seen = False
    try:
        while runner.is_alive() and not seen:
            seen = bool(_pids_with(marker))
            time.sleep(0.05)
        runner.join(timeout=2.0 + 5)
        assert seen, "the sleeper never started"
        assert results and results[0].status == "timeout"
        deadline = time.monotonic() + 5
        while _pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _pids_with(marker) == []
    finally:
        for pid in _pids_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_raw_sockets_do_not_reach_the_host(namespaces):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    program = ("import sys\n"
               "sys.modules.pop('_socket', None)\n"
               "import _socket\n"
               "s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
               f"s.connect(('127.0.0.1', {port}))\n")
    try:
        result = run_program(program)
        with pytest.raises(BlockingIOError):
            listener.accept()[0].close()
        assert not result.passed
    finally:
        listener.close()


def test_ctypes_system_cannot_touch_the_host(namespaces, tmp_path):
    target = tmp_path / f"x_{secrets.token_hex(4)}"
    program = f"import ctypes\nctypes.CDLL(None).system(b'touch {target}')\n"
    run_program(program)
    assert not target.exists()


def test_files_outside_the_workdir_are_not_written(namespaces, tmp_path):
    target = tmp_path / "written.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert not target.exists()
    assert not result.passed


def test_files_outside_the_workdir_are_not_read(namespaces, tmp_path):
    secret = secrets.token_hex(16)
    path = tmp_path / "secret.txt"
    path.write_text(secret)
    program = (f"text = open({str(path)!r}).read()\n"
               "print(text)\n"
               "raise SystemExit(text)\n")
    result = run_program(program)
    assert secret not in result.stdout and secret not in result.detail
    assert "No such file or directory" in result.detail and not result.passed


def test_the_workdir_is_writable(namespaces):
    result = run_program("open('out.txt', 'w').write('x')\nassert open('out.txt').read() == 'x'\n")
    assert result.passed, result.detail


def test_forcing_the_fallback_warns_what_is_not_contained(monkeypatch):
    monkeypatch.setenv("SPECDEC_EXEC_ISOLATION", "basic")
    monkeypatch.setattr(execution, "_mode", None)
    with pytest.warns(RuntimeWarning, match="not cut off from the network"):
        assert execution.isolation_mode() == "basic"


def test_without_unshare_the_fallback_is_used_and_still_judges(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no unshare on it
    monkeypatch.delenv("SPECDEC_EXEC_ISOLATION", raising=False)
    monkeypatch.setattr(execution, "_mode", None)
    with pytest.warns(RuntimeWarning, match="unshare is unavailable"):
        assert not humaneval_passed(WRONG + "raise SystemExit(17)\n", PROBLEM)
    assert execution.isolation_mode() == "basic"
    assert humaneval_passed(PROBLEM["canonical_solution"], PROBLEM)
