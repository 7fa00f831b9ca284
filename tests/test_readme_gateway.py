"""The README's "gateway in Python" example, run as written against a second thrifty server on loopback (the
remote OpenAI-compatible backend): a miss, then an exact hit that never reaches the remote, and the ledger."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.server.app import create_app
from thrifty.server.background import ServerThread

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("### The gateway in Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_gateway_example(tiny_gguf, tmp_path, monkeypatch, capsys):
    code = readme_example()
    assert 'API_BASE = "http://127.0.0.1:8001/v1"' in code
    engine = LLMEngine.from_model(str(tiny_gguf), dtype="float32", num_kv_blocks=128)
    app = create_app(AsyncEngine(engine), "qwen2.5-coder-0.5b-instruct")
    with ServerThread(app) as remote:
        calls = []
        original = app.state.gateway.prepare
        app.state.gateway.prepare = lambda request: calls.append(request.request_id) or original(request)
        script = tmp_path / "example.py"
        script.write_text(code.replace("http://127.0.0.1:8001/v1", remote.url + "/v1"))
        monkeypatch.chdir(tmp_path)
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    miss, hit = re.findall(r"\[(\w[\w-]*); ([^;\]]+; [^;\]]+); \$([0-9.]+)\]", out)
    assert miss[0] == "miss" and miss[1] == "remote; fixed" and float(miss[2]) > 0
    assert hit == ("hit", "remote; cache hit", "0.00000000")
    assert len(calls) == 1                        # the hit never reached the remote
    assert "| remote" in out and "| total" in out
    assert (tmp_path / "responses.sqlite3").exists()
