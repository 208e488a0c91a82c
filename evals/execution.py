"""Run model-written Python (HumanEval completions) in a separate, limited process.

HumanEval's execution rules (Chen et al. 2021, "Evaluating Large Language Models Trained on
Code", and openai/human-eval's ``execution.py``): the program -- the problem's prompt, the
completion, the tests and ``check(entry_point)`` -- runs in its own process, in a temporary
working directory, with a wall-clock timeout, resource limits, the network blocked and
destructive functions disabled. It passes iff it runs to its end without an exception.

Here the child is a fresh ``python -I`` (isolated: no user site-packages, no PYTHONPATH) that,
before it executes the program:

- sets resource limits: address space (``memory_mb``), CPU seconds, file size, no core dumps;
- replaces the socket constructors with one that raises, so any network use fails;
- disables process-spawning and destructive calls (``os.system``, ``os.kill``, ``os.fork``,
  ``subprocess.Popen``, ``shutil.rmtree``, ...).

The parent kills the child's whole process group when the timeout expires. This is a guard
against accidents, not a security sandbox: run untrusted code inside a container as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs in the child around the program; argv: program path, memory MiB, CPU seconds.
_GUARD = r"""
import builtins, os, resource, shutil, socket, subprocess, sys

PASSED = 17  # only reached after the program ran to its end; sys.exit(0) in it does not pass
os_exit = os._exit

program_path, memory_mb, cpu_seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
source = open(program_path, encoding="utf-8").read()
limit_bytes = memory_mb * 1024 * 1024
for name, value in (("RLIMIT_AS", limit_bytes), ("RLIMIT_DATA", limit_bytes),
                    ("RLIMIT_CPU", cpu_seconds), ("RLIMIT_FSIZE", 16 * 1024 * 1024),
                    ("RLIMIT_CORE", 0)):
    if hasattr(resource, name):
        resource.setrlimit(getattr(resource, name), (value, value))

class NetworkBlocked(OSError):
    pass

def _blocked(*args, **kwargs):
    raise NetworkBlocked("network access is disabled while running generated code")

class _BlockedSocket:
    def __init__(self, *args, **kwargs):
        _blocked()

import _socket
for module in (socket, _socket):
    module.socket = _BlockedSocket
socket.SocketType = _BlockedSocket
for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
             "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    if hasattr(socket, name):
        setattr(socket, name, _blocked)

def _disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled while running generated code")
    return refuse

for name in ("_exit", "system", "kill", "killpg", "fork", "forkpty", "execv", "execve", "execvp",
             "spawnv", "spawnve", "posix_spawn", "putenv", "unsetenv", "remove", "unlink",
             "rmdir", "removedirs", "rename", "renames", "truncate", "chmod", "chown", "setuid"):
    if hasattr(os, name):
        setattr(os, name, _disabled("os." + name))
shutil.rmtree = _disabled("shutil.rmtree")
shutil.move = _disabled("shutil.move")
subprocess.Popen = _disabled("subprocess.Popen")
builtins.exit = builtins.quit = _disabled("exit")

sys.argv = [program_path]
exec(compile(source, program_path, "exec"), {"__name__": "__main__"})
os_exit(PASSED)
"""


_PASSED = 17  # the guard's exit status after the program ran to its end


@dataclass
class ExecutionResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""  # the tail of stderr when the program failed


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> ExecutionResult:
    """Execute ``program`` in a limited child process; passed iff it runs to its end."""
    with tempfile.TemporaryDirectory(prefix="specdec-exec-") as workdir:
        path = Path(workdir) / "program.py"
        path.write_text(program, encoding="utf-8")
        command = [sys.executable, "-I", "-c", _GUARD, str(path), str(memory_mb),
                   str(int(timeout) + 1)]
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        child = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 start_new_session=True)
        try:
            _, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the program may have started children
            child.communicate()
            return ExecutionResult(False, "timeout", f"killed after {timeout:g} s")
    if child.returncode == _PASSED:
        return ExecutionResult(True, "passed")
    tail = stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
    return ExecutionResult(False, "failed", "\n".join(tail))


def humaneval_program(problem: dict, completion: str) -> str:
    """The program HumanEval runs: prompt + completion, the tests, ``check(entry_point)``."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")
