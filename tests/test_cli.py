"""`thrifty generate` end to end on a tiny model, and its bad-input paths: one line, exit code 2, no traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tiny_gguf import TinySpec, write_tiny_gguf


def thrifty(*args: str, env_home: Path) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, THRIFTY_HOME=str(env_home))
    return subprocess.run([sys.executable, "-m", "thrifty.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_generate_on_tiny_model(tiny_gguf, tmp_path):
    r = thrifty("generate", "--model", str(tiny_gguf), "--prompt", "hello", "--max-tokens", "5",
                "--temperature", "0", "--dtype", "float32", env_home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello")
    again = thrifty("generate", "--model", str(tiny_gguf), "--prompt", "hello", "--max-tokens", "5",
                    "--temperature", "0", "--dtype", "float32", env_home=tmp_path)
    assert again.stdout == r.stdout  # greedy is deterministic


def test_generate_chat_and_seeded_sampling(tiny_gguf, tmp_path):
    args = ["generate", "--model", str(tiny_gguf), "--prompt", "hi", "--chat", "--max-tokens", "6",
            "--temperature", "0.9", "--seed", "7"]
    a, b = thrifty(*args, env_home=tmp_path), thrifty(*args, env_home=tmp_path)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout


def _truncated(tiny_gguf: Path, tmp_path: Path) -> Path:
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 2])
    return bad


def _garbage(tmp_path: Path) -> Path:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    return bad


def _mamba(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "mamba.gguf", TinySpec(architecture="mamba"))


@pytest.mark.parametrize("case,expect", [
    ("unknown-name", "qwen9"),
    ("missing-file", "does not exist"),
    ("truncated", "truncated"),
    ("garbage", "not a valid GGUF"),
    ("unsupported-arch", "mamba"),
])
def test_bad_model_gives_one_line_exit_2(case, expect, tiny_gguf, tmp_path):
    model = {
        "unknown-name": lambda: "qwen9-coder",
        "missing-file": lambda: str(tmp_path / "nope" / "model.gguf"),
        "truncated": lambda: str(_truncated(tiny_gguf, tmp_path)),
        "garbage": lambda: str(_garbage(tmp_path)),
        "unsupported-arch": lambda: str(_mamba(tmp_path)),
    }[case]()
    r = thrifty("generate", "--model", model, "--prompt", "x", env_home=tmp_path / "home")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("thrifty: error:")]
    assert len(errors) == 1 and expect in errors[0], r.stderr
    assert not list((tmp_path / "home").glob("**/*.partial"))


def test_bad_sampling_flag_is_one_line(tiny_gguf, tmp_path):
    r = thrifty("generate", "--model", str(tiny_gguf), "--prompt", "x", "--temperature", "-1", env_home=tmp_path)
    assert r.returncode == 2 and "temperature" in r.stderr and "Traceback" not in r.stderr
