"""The sandbox and the cascade's code checks (no models needed)."""
from __future__ import annotations

import os
import re
import textwrap
import threading
import time

import pytest

from thrifty.gateway.code_check import check_answer, complete_program, extract_code, prompt_examples
from thrifty.gateway import sandbox
from thrifty.gateway.sandbox import run_python

PROMPT = textwrap.dedent('''\
    Write the Python function below.

    ```python
    from typing import List


    def rolling_max(numbers: List[int]) -> List[int]:
        """ Rolling maximum.
        >>> rolling_max([1, 2, 3, 2, 3, 4, 2])
        [1, 2, 3, 3, 3, 4, 4]
        """
    ```''')
GOOD = textwrap.dedent('''\
    Sure:
    ```python
    from typing import List

    def rolling_max(numbers: List[int]) -> List[int]:
        out, best = [], None
        for n in numbers:
            best = n if best is None else max(best, n)
            out.append(best)
        return out
    ```''')


def test_sandbox_runs_code_and_reports_failure():
    assert run_python("print(6 * 7)").output.strip() == "42"
    bad = run_python("raise SystemExit(3)")
    assert not bad.ok and bad.returncode == 3 and not bad.timed_out


def test_sandbox_kills_code_at_the_timeout():
    r = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert r.timed_out and not r.ok and r.returncode is None


def test_sandbox_limits_memory():
    r = run_python("x = bytearray(1 << 30)\nprint('allocated')", memory_mb=256)
    assert not r.ok and "MemoryError" in r.output and "allocated" not in r.output


def test_sandbox_has_no_network_and_no_environment(monkeypatch):
    monkeypatch.setenv("THRIFTY_SECRET_FOR_TEST", "s3cret")
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert not r.ok and "network access is disabled" in r.output
    r = run_python("import os\nprint(os.environ.get('THRIFTY_SECRET_FOR_TEST'))")
    assert r.ok and r.output.strip() == "None"


def _sandbox_processes() -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if "thrifty-sandbox-" in cmd:
            found.append(entry)
    return found


@pytest.mark.skipif(not sandbox.can_confine(), reason="this kernel allows no unprivileged PID namespace")
def test_sandbox_kills_everything_the_code_forks():
    """Children that leave the process group (setsid) and would outlive the run die with it; a (bounded) fork
    bomb is cut at the timeout."""
    code = ("import os, time\n"
            "for _ in range(20):\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"
            "        time.sleep(600)\n"
            "        os._exit(0)\n"
            "print('forked', flush=True)\n"
            "for _ in range(5):\n"          # a bounded fork bomb: 32 processes, all in the group, all spinning
            "    os.fork()\n"
            "while True:\n"
            "    pass\n")
    result: list = []
    runner = threading.Thread(target=lambda: result.append(run_python(code, timeout_s=2.0)), daemon=True)
    runner.start()
    runner.join(60)  # children holding the output pipe would keep the run (and its request) waiting 600 s
    assert not runner.is_alive(), "the sandbox waited for processes its code forked"
    r = result[0]
    assert r.timed_out and "forked" in r.output
    deadline = time.monotonic() + 5
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes() == []


@pytest.mark.skipif(not sandbox.can_confine(), reason="this kernel allows no unprivileged mount namespace")
def test_sandbox_writes_only_its_own_bounded_directory(tmp_path):
    """Writes outside the working directory fail (read-only mounts it cannot remount); inside, a tmpfs
    bounds the total (a 16 MB cap per file alone would let many files fill the disk)."""
    targets = [str(tmp_path / "escaped.txt"), "/tmp/thrifty-sandbox-escape.txt"]
    code = textwrap.dedent(f"""\
        import os, subprocess
        with open("mine.txt", "w") as f:
            f.write("ok")
        print("own dir", open("mine.txt").read())
        for target in {targets!r}:
            try:
                with open(target, "w") as f:
                    f.write("escaped")
                print("WROTE", target)
            except OSError as e:
                print("refused", os.strerror(e.errno))
        print("remount", subprocess.run(["mount", "-o", "remount,rw", "/"], capture_output=True).returncode)
        written = 0
        try:
            for i in range(8):
                with open(f"fill{{i}}", "wb") as f:
                    f.write(b"0" * (15 << 20))
                written += 15
        except OSError as e:
            print("fill stopped", written, os.strerror(e.errno))
        """)
    r = run_python(code, timeout_s=20.0)
    assert r.ok, r.output
    assert "own dir ok" in r.output and "WROTE" not in r.output
    assert r.output.count("refused Read-only file system") == len(targets)
    assert "remount 0" not in r.output
    stopped = re.search(r"fill stopped (\d+) No space left on device", r.output)
    assert stopped and int(stopped.group(1)) < 120, r.output
    assert not any(os.path.exists(t) for t in targets)


def test_extract_code_prefers_python_fences():
    assert extract_code("text\n```python\nx = 1\n```\nmore\n```bash\nls\n```") == "x = 1"
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1"
    assert extract_code("no code here at all") is None
    assert extract_code("```python\ny = 2\n") == "y = 2"            # cut off before the closing fence


def test_prompt_examples_from_doctests_and_inline_forms():
    assert prompt_examples(PROMPT) == [("rolling_max([1, 2, 3, 2, 3, 4, 2])", "[1, 2, 3, 3, 3, 4, 4]")]
    inline = 'def solve(s):\n    """Examples\n    solve("ab") = "AB"\n    for f(7, 3) == 34\n    g(1) ==> True\n    """\n'
    assert prompt_examples(inline) == [('solve("ab")', '"AB"'), ("f(7, 3)", "34"), ("g(1)", "True")]
    # after a label or inside a sentence, as prompts write them
    labelled = "Write f(n), the nth square plus one.\nExample: f(3) == 10.\nFor example, f(0) returns 1.\ne.g. f(g(1)) == 2"
    assert prompt_examples(labelled) == [("f(3)", "10"), ("f(0)", "1"), ("f(g(1))", "2")]
    assert prompt_examples("What is the capital of France?") == []


def test_check_answer_runs_the_prompts_examples():
    ok = check_answer(PROMPT, GOOD)
    assert ok.passed and ok.examples == 1 and ok.reason == "1 examples pass"
    wrong = check_answer(PROMPT, GOOD.replace("max(best, n)", "min(best, n)"))
    assert not wrong.passed and wrong.reason == "examples failed"
    broken = check_answer(PROMPT, "```python\ndef rolling_max(numbers:\n```")
    assert not broken.passed and broken.reason == "code does not parse"
    assert check_answer(PROMPT, "I cannot help with that.").reason == "no code"


def test_a_bare_body_continues_the_prompts_code():
    prompt_code = "def add(a, b):\n    \"\"\"Add.\"\"\"\n"
    program = complete_program(prompt_code, "    return a + b\n", "add")
    assert run_python(program + "assert add(2, 3) == 5\n").ok
    # a full definition replaces the prompt's stub but keeps its imports
    program = complete_program("from math import sqrt\n\ndef r(x):\n    pass\n", "def r(x):\n    return sqrt(x)\n", "r")
    assert run_python(program + "assert r(9) == 3\n").ok


@pytest.mark.parametrize("answer, escalate", [(GOOD, False), (GOOD.replace("max(best", "min(best"), True)])
def test_cascade_escalates_when_the_examples_fail(answer, escalate):
    from thrifty.gateway.cascade import CascadeRouter
    from thrifty.gateway.router import Answer, RouteRequest

    router = CascadeRouter(["small", "large"], check="code", threshold=0.5)
    up, reason = router.escalate(RouteRequest(PROMPT), Answer(answer, [-0.1] * 5), "small")
    assert up is escalate and reason.startswith("cascade")
    assert router.escalate(RouteRequest(PROMPT), Answer(answer), "large") == (False, "cascade: largest tier")
