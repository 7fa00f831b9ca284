"""`thrifty serve`: the typed YAML config, CLI defaults and overrides, and a real server process that
authenticates with a key from the environment, never logs it, and drains gracefully on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from thrifty import cli
from thrifty.config import DEFAULT_MODEL, ConfigError, ThriftyConfig, load_config
from tiny_gguf import TinySpec, write_tiny_gguf


def test_config_yaml(tmp_path):
    path = tmp_path / "thrifty.yaml"
    path.write_text("model: /models/my-model.gguf\nengine:\n  dtype: float32\n  kv_cache_memory: 0.5\n"
                    "server:\n  port: 9000\n  max_waiting_requests: 4\n  shutdown_timeout_s: 5\n"
                    "  api_key_env: MY_KEY\n")
    config = load_config(path)
    assert config.model == "/models/my-model.gguf" and config.served_model_name() == "my-model"
    assert config.engine == {"dtype": "float32", "kv_cache_memory": 0.5}
    assert config.engine_config().kv_cache_memory == 0.5
    assert config.server.port == 9000 and config.server.max_waiting_requests == 4
    assert config.server.shutdown_timeout_s == 5.0 and config.server.host == "127.0.0.1"
    assert load_config(None) == ThriftyConfig() and ThriftyConfig().served_model_name() == DEFAULT_MODEL


@pytest.mark.parametrize("text,needle", [
    ("modle: x\n", "unknown key(s) in the config: modle"),
    ("server:\n  prot: 1\n", "unknown key(s) in server: prot"),
    ("server:\n  port: eighty\n", "server.port must be int"),
    ("server:\n  max_body_bytes: 0\n", "max_body_bytes must be >= 1"),
    ("engine: [1, 2]\n", "engine must be dict"),
    ("- just a list\n", "must be a mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_config_errors(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value)


def test_bad_engine_field_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="known engine fields"):
        ThriftyConfig(engine={"kv_cache_gb": 1}).engine_config()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    assert cli.main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 2


def test_serve_defaults_and_overrides(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("thrifty.server.run.serve", lambda config, api_key: seen.append((config, api_key)))
    monkeypatch.delenv("THRIFTY_API_KEY", raising=False)
    assert cli.main(["serve"]) == 0
    config, key = seen[-1]
    assert (config.model, config.server.host, config.server.port, key) == (DEFAULT_MODEL, "127.0.0.1", 8000, None)
    monkeypatch.setenv("THRIFTY_API_KEY", "from-env")
    assert cli.main(["serve", "--model", "m.gguf", "--host", "0.0.0.0", "--port", "8123"]) == 0
    config, key = seen[-1]
    assert (config.model, config.server.host, config.server.port, key) == ("m.gguf", "0.0.0.0", 8123, "from-env")
    assert cli.main(["serve", "--api-key", "from-flag"]) == 0
    assert seen[-1][1] == "from-flag"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return False
    except OSError:
        return True


def test_serve_process_auth_and_graceful_sigterm(tmp_path):
    model = write_tiny_gguf(tmp_path / "long-tiny.gguf", TinySpec(context_length=2048))
    port, key = _free_port(), "sk-never-log-me"
    config = tmp_path / "thrifty.yaml"
    config.write_text(f"model: {model}\nengine:\n  dtype: float32\n  num_kv_blocks: 160\n"
                      f"server:\n  port: {port}\n  api_key_env: TEST_SERVE_KEY\n  max_output_tokens: 2000\n"
                      "  shutdown_timeout_s: 60\n")
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "thrifty"), "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT,
                            # its own home: the throughput probe and the cost ledger stay out of the user's
                            env={**os.environ, "TEST_SERVE_KEY": key, "THRIFTY_HOME": str(tmp_path / "home")})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
        assert models["data"][0]["id"] == "long-tiny"

        events: list[str] = []
        first = threading.Event()
        finished_at: list[float] = []

        def stream() -> None:
            body = {"model": "long-tiny", "prompt": "go", "max_tokens": 1500, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {key}"}) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        first.set()
            finished_at.append(time.monotonic())

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        while not _refused(port):  # stops accepting new connections ...
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused_at = time.monotonic()
        t.join(120)
        assert finished_at and refused_at < finished_at[0]  # ... while the running request goes on
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 1500
        # drained, then exits; uvicorn re-raises the caught SIGTERM after its shutdown, as servers under
        # a supervisor are expected to
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = Path(log.name).read_text()
    assert "serving 'long-tiny'" in text and "API key on" in text
    assert key not in text
