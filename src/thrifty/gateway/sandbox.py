"""Run untrusted Python (model-written code) in a subprocess with time, memory, file and no-network limits.

Layers, each cheap: a fresh interpreter in isolated mode (`-I`: no user site, no PYTHON* variables, no cwd
on sys.path) with an empty environment, in a new session; rlimits on address space, CPU seconds, file size
and open files; a wall-clock timeout that kills the whole process group. Where the kernel allows
unprivileged user namespaces (`unshare`), the code also gets its own network, PID and mount namespaces: only
a loopback that is down; every process it forks dies with it, even one that left the process group; its
working directory is a small tmpfs and every other mount is read-only to it, and it starts without
capabilities, so it cannot remount them writable. Elsewhere the code can write wherever the server's user
can (a warning says so once). In every case a prelude replaces the socket constructors with one that
raises. This stops accidents and sloppy code, not a determined attacker with a kernel exploit; run the
gateway itself in a container for that.
"""
from __future__ import annotations

import functools
import logging
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


log = logging.getLogger(__name__)

# the code runs as PID 1 of its own namespace: when it ends (or is killed), the kernel kills what it forked
_UNSHARE = ("--net", "--pid", "--mount", "--fork", "--kill-child", "--map-root-user")
_TMPFS_MB = 64

# Runs as root of the new user namespace, before the code: mounts a tmpfs on the working directory (its
# only writable place, bounded in size), makes every other mount read-only (keeping each mount's own
# flags: a user namespace may not clear nosuid / nodev), then drops every capability for the code.
# Fails closed: a mount it cannot make read-only stops the run.
_CONFINE = r"""
work=$1; size_mb=$2; shift 2
mount -t tmpfs -o "size=${size_mb}m,mode=0700" thrifty-sandbox "$work" || exit 97
while read -r _id _parent _dev _root mnt opts _rest; do
  mnt=$(printf '%b' "$mnt")
  [ "$mnt" = "$work" ] && continue
  flags=ro
  IFS=,
  for o in $opts; do case $o in rw|ro) ;; *) flags="$flags,$o" ;; esac; done
  unset IFS
  mount -o "remount,bind,$flags" "$mnt" 2>/dev/null \
    || { echo "thrifty sandbox: cannot make $mnt read-only" >&2; exit 97; }
done < /proc/self/mountinfo
cd "$work" || exit 97
exec setpriv --bounding-set=-all --inh-caps=-all --no-new-privs "$@"
"""


_TOOLS = ("unshare", "sh", "setpriv", "mount")


def _confined(argv: list[str], work: str) -> list[str]:
    unshare, sh = (shutil.which(t) or t for t in _TOOLS[:2])
    return [unshare, *_UNSHARE, sh, "-c", _CONFINE, "sh", work, str(_TMPFS_MB), *argv]


@functools.cache
def can_confine() -> bool:
    """True when the code can run in its own network, PID and mount namespaces here (probed once)."""
    ok = all(shutil.which(t) for t in _TOOLS) and _probe_confinement()
    if not ok:
        log.warning("no unprivileged namespaces here: sandboxed code runs with the network socket blocked but "
                    "can write files wherever this user can and its forks may outlive it")
    return ok


def _probe_confinement() -> bool:
    with tempfile.TemporaryDirectory(prefix="thrifty-sandbox-") as tmp:
        try:
            return subprocess.run(_confined(["true"], tmp), capture_output=True, timeout=10,
                                  env={"PATH": os.defpath}).returncode == 0
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
        script, cwd = os.path.join(work, "main.py"), os.path.join(work, "cwd")
        os.mkdir(cwd)
        with open(script, "w", encoding="utf-8") as f:
            f.write(_PRELUDE + code)
        argv = [sys.executable, "-I", script]
        if can_confine():
            argv = _confined(argv, cwd)
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        cpu_s = max(1, int(timeout_s) + 1)
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
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
