"""Run untrusted Python (model-written code) in a subprocess with time, memory and no-network limits.

Layers, each cheap: a fresh interpreter in isolated mode (`-I`: no user site, no PYTHON* variables, no cwd
on sys.path) with an empty environment, in a new session inside a throw-away directory; rlimits on
address space, CPU seconds, file size and open files; a wall-clock timeout that kills the whole process
group; where the kernel allows unprivileged user namespaces, new network and PID namespaces (`unshare --net
--pid`: only a loopback that is down, and every process the code forks dies with it, even one that left the
process group); in every case a prelude that replaces the socket constructors with one that raises. Files
outside the throw-away directory are not hidden: the code runs as the server's user. This stops accidents and sloppy code, not a determined attacker with a
kernel exploit; run the gateway itself in a container for that.
"""
from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

_PRELUDE = textwrap.dedent("""\
    import socket as _s
    def _no_network(*a, **k):
        raise OSError("network access is disabled in the thrifty sandbox")
    _s.socket = _s.create_connection = _s.socketpair = _s.getaddrinfo = _no_network
    del _s
    """)


@dataclass(slots=True)
class SandboxResult:
    ok: bool                 # exit status 0 within the limits
    returncode: int | None   # None: killed at the timeout
    timed_out: bool
    output: str              # the tail of stdout + stderr (why it failed)


# the code runs as PID 1 of its own namespace: when it ends (or is killed), the kernel kills what it forked
_UNSHARE = ("--net", "--pid", "--fork", "--kill-child", "--map-root-user")


@functools.cache
def _can_unshare_net() -> bool:
    """True when an unprivileged process may create its own network and PID namespaces here."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, *_UNSHARE, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _limits(memory_mb: int, cpu_s: int) -> None:
    """Runs in the child between fork and exec."""
    mem = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 512, max_output: int = 2000) -> SandboxResult:
    """Run `code` as a script under the sandbox's limits; never raises for anything the code does."""
    with tempfile.TemporaryDirectory(prefix="thrifty-sandbox-") as work:
        script = os.path.join(work, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(_PRELUDE + code)
        argv = [sys.executable, "-I", script]
        if _can_unshare_net():
            argv = [shutil.which("unshare") or "unshare", *_UNSHARE, *argv]
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        cpu_s = max(1, int(timeout_s) + 1)
        try:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=functools.partial(_limits, memory_mb, cpu_s))
        except OSError as e:
            return SandboxResult(False, None, False, f"could not start the sandbox: {e}")
        try:
            out, _ = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            timed_out = True
        text = out.decode("utf-8", errors="replace")[-max_output:]
        code_ = None if timed_out else proc.returncode
        return SandboxResult(code_ == 0, code_, timed_out, text)
