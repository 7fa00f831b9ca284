"""Shared fixtures: tiny random GGUF models (fast) and the real zoo models (marked `real`)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import settings

# `make test` runs the property tests on a fixed seed, so a run is repeatable and a red CI is a real change;
# `pytest --hypothesis-profile=explore` draws fresh examples (what found the surrogate-pair case).
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("repeatable")

sys.path.insert(0, str(Path(__file__).parent))

from tiny_gguf import TinySpec, write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Qwen2 with qkv bias, untied head, GQA 4:2, written once per session."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.gguf", TinySpec())


@pytest.fixture(scope="session")
def qwen05_gguf() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct GGUF (pulled by `make install`)."""
    from thrifty.models import zoo

    return zoo.resolve("qwen2.5-coder-0.5b-instruct")
