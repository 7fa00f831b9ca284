"""/openapi.json is a valid OpenAPI document, and a bounded schemathesis run against it finds no 5xx."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from thrifty.config import ServerSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.server.app import create_app
from thrifty.server.background import ServerThread


@pytest.fixture(scope="module")
def server(tiny_gguf):
    engine = LLMEngine.from_model(str(tiny_gguf), dtype="float32", num_kv_blocks=256)
    # Small limits keep fuzzed requests cheap: outputs of at most 8 tokens, waiting queue large enough.
    app = create_app(AsyncEngine(engine), "tiny", ServerSettings(max_output_tokens=8, max_waiting_requests=64))
    with ServerThread(app) as srv:
        yield srv


def test_openapi_is_valid(server):
    from openapi_spec_validator import validate

    spec = httpx.get(server.url + "/openapi.json").json()
    validate(spec)
    paths = spec["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"):
        assert path in paths
    chat = paths["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "429"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]


def test_schemathesis_finds_no_server_errors(server, tmp_path: Path):
    st = Path(sys.executable).parent / "st"
    cmd = [str(st), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
           "--max-examples", "30", "--max-time", "20", "--seed", "4", "--no-shrink", "--workers", "1",
           "--generation-database", "none", "--request-timeout", "20", "--phases", "examples,coverage,fuzzing",
           "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-6000:]
    assert "ST101" not in report  # schemathesis' code for a 5xx
    generated = re.search(r"(\d+) generated", report)
    assert generated and int(generated.group(1)) >= 100, report[-3000:]
