"""Run model-written Python (HumanEval completions) in a separate, contained process.

HumanEval's execution rules (Chen et al. 2021, "Evaluating Large Language Models Trained on
Code", and openai/human-eval's ``execution.py``): the program -- the problem's prompt, the
completion, the tests and ``check(entry_point)`` -- runs in its own process, in a temporary
working directory, with a wall-clock timeout, resource limits, the network blocked and
destructive functions disabled. It passes iff it runs to its end without an exception.

Two processes run on the far side of the parent (docs/sandbox.md has the full design):

- the *runner*, a small trusted ``python -I`` that never executes generated code. Where
  ``unshare`` works it is the init process of fresh user, PID, network and mount namespaces and
  first builds a read-only root (the system and Python directories bind-mounted read-only, the
  working directory the only writable path, no ``/proc``), then forks
- the *program process*, which closes every inherited descriptor except a private "done" pipe,
  drops all capabilities, sets resource limits (address space, CPU seconds, file size, no core
  dumps), installs Python-level guards (sockets, process spawning, destructive calls) and
  executes the program; only when it ran to its end does it write to the "done" pipe.

The verdict is not an exit status: the parent writes a random nonce to the runner's stdin and
passes iff the runner copies exactly that nonce to a file only the runner holds, which it does
after the program process has exited and reported completion. The runner reads the nonce only
then, so it is in no memory the program can reach. At the timeout the parent kills the process
group; the runner's death tears down the whole PID namespace. Output goes to size-capped files,
never pipes, so descendants that keep them open cannot stall the parent.

Where namespaces are unavailable (or ``SPECDEC_EXEC_ISOLATION=basic``) the same two processes
run with rlimits, a new session and the Python-level guards only; a warning says so once.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# The trusted runner. argv: workdir, memory MiB, CPU seconds, verdict fd, new root ('' = none).
_RUNNER = r"""
import ctypes, os, resource, signal, sys, traceback

workdir, memory_mb, cpu_seconds, verdict_fd, root = sys.argv[1:6]
memory_mb, cpu_seconds, verdict_fd = int(memory_mb), int(cpu_seconds), int(verdict_fd)
libc = ctypes.CDLL(None, use_errno=True)
_exit = os._exit

def prctl(*args):  # absent outside Linux: the fallback then runs without these settings
    return libc.prctl(*args, *[0] * (5 - len(args))) if hasattr(libc, "prctl") else -1

def check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), "mount " + target)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
ST_TO_MS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: 1024, 2048: 2048,
            4096: 1 << 21}  # rdonly nosuid nodev noexec noatime nodiratime relatime

def kept_flags(path):  # flags a user namespace may not clear on a remount
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in ST_TO_MS.items() if f_flag & st)

def bind(path, target, writable=False):
    mount(path, target, None, MS_BIND | MS_REC)
    submounts = [line.split()[4] for line in open("/proc/self/mountinfo")]
    for point in [target] + [p for p in submounts if p.startswith(target.rstrip("/") + "/")]:
        flags = kept_flags(point) | MS_NOSUID | MS_NODEV
        mount(None, point, None, MS_BIND | MS_REMOUNT | flags | (0 if writable else MS_RDONLY))

def build_root(root):
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    python = [sys.prefix, sys.base_prefix, sys.exec_prefix,
              os.path.dirname(os.path.realpath(sys.executable))]
    paths = sorted({os.path.realpath(p) for p in python} | {"/usr", "/bin", "/sbin", "/lib",
                   "/lib32", "/lib64", "/libx32"})
    for path in paths:
        target = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path) and not any(path.startswith(p + "/") for p in paths):
            os.makedirs(target, exist_ok=True)
            bind(path, target)
    os.makedirs(root + "/dev")
    for name in ("null", "zero", "random", "urandom"):
        open(f"{root}/dev/{name}", "w").close()
        mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    os.makedirs(root + workdir)
    bind(workdir, root + workdir, writable=True)
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)

def drop_privileges():
    prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
    cap = 0
    while prctl(24, cap) == 0:  # PR_CAPBSET_DROP, until past the last capability
        cap += 1
    prctl(28, 0x2F)  # PR_SET_SECUREBITS: no root privileges on exec, locked
    if hasattr(libc, "capset"):  # no effective, permitted or inheritable capabilities
        libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)())

def set_limits():
    limit_bytes = memory_mb * 1024 * 1024
    for name, value in (("RLIMIT_AS", limit_bytes), ("RLIMIT_DATA", limit_bytes),
                        ("RLIMIT_CPU", cpu_seconds), ("RLIMIT_FSIZE", 16 * 1024 * 1024),
                        ("RLIMIT_CORE", 0)):
        if hasattr(resource, name):
            resource.setrlimit(getattr(resource, name), (value, value))

def install_guards():
    import builtins, shutil, socket, subprocess, _socket

    def refuse(message):
        def refused(*args, **kwargs):
            raise PermissionError(message)
        return refused

    blocked = refuse("network access is disabled while running generated code")
    class BlockedSocket:
        def __init__(self, *args, **kwargs):
            blocked()
    for module in (socket, _socket):
        module.socket = module.SocketType = BlockedSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(socket, name):
            setattr(socket, name, blocked)
    for name in ("_exit", "system", "kill", "killpg", "fork", "forkpty", "setsid", "execv",
                 "execve", "execvp", "spawnv", "spawnve", "posix_spawn", "putenv", "unsetenv",
                 "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "truncate",
                 "chmod", "chown", "setuid"):
        if hasattr(os, name):
            setattr(os, name, refuse(f"os.{name} is disabled while running generated code"))
    shutil.rmtree = refuse("shutil.rmtree is disabled while running generated code")
    shutil.move = refuse("shutil.move is disabled while running generated code")
    subprocess.Popen = refuse("subprocess.Popen is disabled while running generated code")
    builtins.exit = builtins.quit = refuse("exit is disabled while running generated code")

def execute():  # whether the program ran to its end (exiting before it is a failure)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # was the nonce pipe
    os.closerange(3, done_w)
    os.closerange(done_w + 1, max(os.sysconf("SC_OPEN_MAX"), verdict_fd + 1))
    drop_privileges()
    set_limits()
    path = os.path.join(workdir, "program.py")
    code = compile(open(path, encoding="utf-8").read(), path, "exec")
    install_guards()
    sys.argv = [path]
    try:
        exec(code, {"__name__": "__main__"})
    except SystemExit as stop:
        print(f"the program exited before its end (SystemExit: {stop.code!r})", file=sys.stderr)
        return False
    return True

def run_program(write=os.write):
    try:
        completed = execute()
    except BaseException:
        completed = False
        try:
            traceback.print_exc()
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    if completed:
        write(done_w, b"\x01")
    _exit(0)

signal.signal(signal.SIGINT, signal.SIG_DFL)
try:
    os.setsid()
except OSError:
    pass
prctl(4, 0)  # PR_SET_DUMPABLE 0: no /proc access, no ptrace from the program
try:
    if root:
        build_root(root)
    os.chdir(workdir)
except OSError as error:
    print(f"sandbox setup failed: {error}", file=sys.stderr)
    _exit(3)
done_r, done_w = os.pipe()
child = os.fork()
if child == 0:
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the runner
    run_program()
os.close(done_w)
os.waitpid(child, 0)
os.set_blocking(done_r, False)
try:
    done = os.read(done_r, 1) == b"\x01"
except BlockingIOError:
    done = False
if done:
    os.write(verdict_fd, os.read(0, 256))
_exit(0)
"""

_ISOLATION_ENV = "SPECDEC_EXEC_ISOLATION"  # "basic" forces the fallback without namespaces
_UNSHARE = ["--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--net", "--mount",
            "--ipc"]
_mode: str | None = None  # "namespaces" | "basic", decided on first use
_OUTPUT_TAIL = 64 * 1024  # bytes of stdout / stderr the result keeps


@dataclass
class ExecutionResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""  # the tail of stderr when the program failed
    stdout: str = ""  # the tail of the program's standard output


def isolation_mode() -> str:
    """"namespaces" where user/PID/network/mount namespaces work here, else "basic"."""
    global _mode
    if _mode is None:
        _mode = "basic"
        if os.environ.get(_ISOLATION_ENV, "auto") != "basic" and shutil.which("unshare"):
            _mode = "namespaces"
            probe = _run("pass\n", 10.0, 256)
            _mode = "namespaces" if probe.passed else "basic"
            why = f"unshare failed: {probe.detail or probe.status}"
        else:
            why = f"unshare is unavailable or {_ISOLATION_ENV}=basic"
        if _mode == "basic":
            warnings.warn(f"generated code runs without namespaces ({why}): it is "
                          "not cut off from the network, other "
                          "processes or the filesystem by the OS; only rlimits, a new session "
                          "and Python-level guards apply", RuntimeWarning, stacklevel=2)
    return _mode


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> ExecutionResult:
    """Execute ``program`` in a contained child process; passed iff it runs to its end."""
    isolation_mode()
    return _run(program, timeout, memory_mb)


def _run(program: str, timeout: float, memory_mb: int) -> ExecutionResult:
    with tempfile.TemporaryDirectory(prefix="specdec-exec-") as workdir, \
            tempfile.TemporaryDirectory(prefix="specdec-run-") as private:
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        root = os.path.join(private, "root") if _mode == "namespaces" else ""
        if root:
            os.mkdir(root)
        nonce = secrets.token_hex(16).encode()
        files = [open(os.path.join(private, name), "w+b") for name in ("out", "err", "verdict")]
        try:
            status = _supervise(files, nonce, [workdir, str(memory_mb), str(int(timeout) + 1),
                                               str(files[2].fileno()), root], timeout)
            stdout, stderr, verdict = (_tail(f) for f in files)
        finally:
            for f in files:
                f.close()
    if status == "timeout":
        return ExecutionResult(False, "timeout", f"killed after {timeout:g} s", stdout)
    if verdict == nonce.decode():
        return ExecutionResult(True, "passed", "", stdout)
    tail = "\n".join(stderr.strip().splitlines()[-5:])
    return ExecutionResult(False, "failed", tail or "the program stopped before its end", stdout)


def _supervise(files: list, nonce: bytes, args: list[str], timeout: float) -> str:
    """Start the runner, wait for it (not for its output), kill its group at the deadline."""
    command = [sys.executable, "-I", "-c", _RUNNER, *args]
    if _mode == "namespaces":
        command = ["unshare", *_UNSHARE, *command]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": args[0]}
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    try:
        child = subprocess.Popen(command, cwd=args[0], env=env, stdin=nonce_r, stdout=files[0],
                                 stderr=files[1], pass_fds=(files[2].fileno(),),
                                 start_new_session=True)
    finally:
        os.close(nonce_r)
    finished = _wait_unreaped(child, timeout)
    _kill_group(child.pid)  # at the deadline, or leftovers of the fallback (no PID namespace)
    child.wait()
    return "finished" if finished else "timeout"


def _wait_unreaped(child: subprocess.Popen, timeout: float) -> bool:
    """Whether ``child`` exits in ``timeout``; it stays a zombie so its group id stays ours."""
    if not hasattr(os, "waitid"):
        try:
            child.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline, delay = time.monotonic() + timeout, 0.0005
    while os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(2 * delay, 0.02)
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _OUTPUT_TAIL))
    return f.read().decode("utf-8", "replace")


def humaneval_program(problem: dict, completion: str) -> str:
    """The program HumanEval runs: prompt + completion, the tests, ``check(entry_point)``."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")
