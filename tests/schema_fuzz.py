"""A long schemathesis run (every phase, stateful links included) against the tiny test model's server: the
reproducible command behind the results' schemathesis report. CI runs a small one (test_server_schema.py).

    PYTHONPATH=src python tests/schema_fuzz.py --max-examples 250 --out report.txt

Exit status 0 when schemathesis found no failure; its own output goes to --out (and the last lines to stdout)."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_gguf import TinySpec, write_tiny_gguf  # noqa: E402

from thrifty.config import ServerSettings  # noqa: E402
from thrifty.engine.async_engine import AsyncEngine  # noqa: E402
from thrifty.engine.engine import LLMEngine  # noqa: E402
from thrifty.server.app import create_app  # noqa: E402
from thrifty.server.background import ServerThread  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-examples", type=int, default=250, help="per operation and phase")
    p.add_argument("--seed", type=int, default=20)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="thrifty-schema-fuzz-") as tmp:
        model = write_tiny_gguf(Path(tmp) / "tiny-qwen2.gguf", TinySpec())
        engine = LLMEngine.from_model(str(model), dtype="float32", num_kv_blocks=256)
        # the CI test's limits: outputs of at most 8 tokens, a waiting queue large enough for the fuzzer
        app = create_app(AsyncEngine(engine), "tiny", ServerSettings(max_output_tokens=8, max_waiting_requests=64))
        with ServerThread(app) as srv:
            st = Path(sys.executable).parent / "st"
            cmd = [str(st), "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error",
                   "--max-examples", str(args.max_examples), "--seed", str(args.seed), "--no-shrink",
                   "--workers", "1", "--generation-database", "none", "--request-timeout", "30",
                   "--phases", "examples,coverage,fuzzing,stateful", "--no-color"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp,
                                  env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    report = proc.stdout + proc.stderr
    args.out.write_text(f"$ {' '.join(['st', *cmd[1:]])}\n(server: the tiny test model, ServerSettings("
                        f"max_output_tokens=8, max_waiting_requests=64))\n\n{report}")
    print(report[-3000:])
    generated = re.search(r"(\d+) generated", report)
    print(f"\nexit {proc.returncode}; test cases generated: {generated.group(1) if generated else '?'}; "
          f"5xx (ST101) seen: {'ST101' in report}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
