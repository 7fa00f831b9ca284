"""`thrifty serve` refuses bad tier configs with one line before any model loads; `thrifty report` prints the
ledger's totals (table, JSON, PNG); `auto` prices come from a throughput probe that is stored and reused."""
from __future__ import annotations

import json
import time

import pytest

from thrifty import cli
from thrifty.config import PriceSettings, RouterSettings, ServerSettings, ThriftyConfig, TierSettings
from thrifty.engine.engine import LLMEngine
from thrifty.gateway.costs import auto_price
from thrifty.gateway.ledger import Charge, Ledger
from thrifty.engine.throughput import measured_throughput, probe_key
from thrifty.gateway.tiers import build_gateway

ENGINE = dict(dtype="float32", num_kv_blocks=128, block_size=16)
PRICE = "price: {input: 1, cached_input: 0.5, output: 2}"
LOCAL = f"  - name: small\n    model: never-loaded.gguf\n    {PRICE}\n"
REMOTE = "  - name: cloud\n    model: gpt-x\n    api_base: http://127.0.0.1:9/v1\n"


@pytest.mark.parametrize("yaml,needle", [
    ("router:\n  strategy: magic\n", "router.strategy must be one of fixed, classifier, cascade, got 'magic'"),
    ("model_list:\n  - name: small\n    model: never-loaded.gguf\n", "tier 'small' has no price"),
    (f"model_list:\n{LOCAL}{REMOTE}    api_key_env: THRIFTY_TEST_UNSET_KEY\n    {PRICE}\n",
     "tier 'cloud': the environment variable THRIFTY_TEST_UNSET_KEY (its api_key_env) is not set"),
    (f"model_list:\n{LOCAL}{REMOTE}    price: {{input: auto, cached_input: auto, output: auto}}\n",
     "tier 'cloud' is remote: its price cannot be auto"),
    (f"model_list:\n{LOCAL}{LOCAL}", "duplicate tier name 'small' in model_list"),
    (f"model_list:\n  - name: auto\n    model: m.gguf\n    {PRICE}\n", "the tier name 'auto' is reserved"),
    (f"model_list:\n{LOCAL}    engine: {{kv_cache_gb: 1}}\n", "tier 'small': bad engine section"),
    (f"model_list:\n{LOCAL}router:\n  strategy: fixed\n  tier: large\n", "router.tier 'large' is not a tier"),
    (f"model_list:\n{LOCAL}router:\n  strategy: cascade\n", "needs at least two tiers"),
])
def test_serve_refuses_bad_tier_configs_before_loading(tmp_path, monkeypatch, capsys, yaml, needle):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(LLMEngine, "from_model", no_load)
    monkeypatch.delenv("THRIFTY_TEST_UNSET_KEY", raising=False)
    path = tmp_path / "thrifty.yaml"
    path.write_text(yaml)
    assert cli.main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("thrifty: error: ") and needle in err[0], err


def _ledger(path) -> None:
    ledger = Ledger(path)
    ledger.book([Charge("r1", "small", 100, 20, 10, 1.2e-4, 9.0e-4, ts=time.time() - 86400 * 30),
                 Charge("r2", "small", 50, 0, 5, 6.0e-5, 0.0, final=False),
                 Charge("r2", "large", 50, 0, 6, 5.0e-4, 5.0e-4, reason="large; cascade: examples failed"),
                 Charge("r3", "small", 40, 40, 4, 0.0, 3.0e-4, saved_cache_usd=4.8e-5, cache="hit")])
    ledger.close()


def test_report_cli(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite3"
    _ledger(path)
    out_json, png = tmp_path / "report.json", tmp_path / "report.png"
    assert cli.main(["report", "--ledger", str(path), "--json", str(out_json), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "| small" in text and "| large" in text and "| total" in text
    assert "3 requests: $0.000680 spent, $0.001700 on the baseline tier alone" in text
    report = json.loads(out_json.read_text())
    total = report["total"]
    assert total["requests"] == 3 and total["attempts"] == 4 and total["cost_usd"] == pytest.approx(6.8e-4)
    assert total["saved_cache_usd"] == pytest.approx(4.8e-5)
    assert total["saved_routing_usd"] == pytest.approx(1.7e-3 - 6.8e-4 - 4.8e-5)
    assert png.read_bytes()[:4] == b"\x89PNG"
    # --since leaves out the month-old request; --config names the ledger and orders the tiers
    config = tmp_path / "thrifty.yaml"
    config.write_text(f"server:\n  ledger_path: {path}\nmodel_list:\n  - name: large\n    model: x\n    {PRICE}\n"
                      f"  - name: small\n    model: y\n    {PRICE}\n")
    since = time.strftime("%Y-%m-%d", time.localtime(time.time() - 86400 * 7))
    assert cli.main(["report", "--config", str(config), "--since", since]) == 0
    text = capsys.readouterr().out
    assert "2 requests:" in text and text.index("| large") < text.index("| small")


def test_report_cli_errors(tmp_path, capsys):
    assert cli.main(["report", "--ledger", str(tmp_path / "none.sqlite3")]) == 2
    assert "no cost ledger" in capsys.readouterr().err
    _ledger(tmp_path / "l.sqlite3")
    assert cli.main(["report", "--ledger", str(tmp_path / "l.sqlite3"), "--since", "last week"]) == 2
    assert "not an ISO 8601 date" in capsys.readouterr().err


def test_auto_price_probe_is_stored_and_reused(tiny_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("THRIFTY_HOME", str(tmp_path))
    engine = LLMEngine.from_model(str(tiny_gguf), **ENGINE)
    first, reused = measured_throughput(engine)
    assert not reused and first.prefill_tokens_per_s > 0 and first.decode_tokens_per_s > 0
    assert first.probes == 3 and first.prefill_range[0] <= first.prefill_tokens_per_s <= first.prefill_range[1]
    assert first.decode_range[0] <= first.decode_tokens_per_s <= first.decode_range[1]
    stored = list((tmp_path / "throughput").glob("*.json"))
    assert len(stored) == 1 and engine.block_manager.stats.queries == 0  # the probe is not traffic
    again, reused = measured_throughput(engine)
    assert reused and again == first
    # other engine options reuse it; another weight format does not
    assert probe_key(LLMEngine.from_model(str(tiny_gguf), **{**ENGINE, "max_num_seqs": 4})) == probe_key(engine)
    assert probe_key(LLMEngine.from_model(str(tiny_gguf), **{**ENGINE, "weights": "int8"})) != probe_key(engine)
    # a server start derives the tier's prices from the stored measurement, and says so
    config = ThriftyConfig(model_list=[TierSettings("small", str(tiny_gguf), dict(ENGINE), price=PriceSettings()),
                                       TierSettings("cloud", "m", api_base="http://127.0.0.1:9/v1",
                                                    price=PriceSettings(1.0, "auto", 4.0))],
                           router=RouterSettings(machine_usd_per_hour=0.5, cached_input_fraction=0.25),
                           server=ServerSettings(ledger_path=str(tmp_path / "ledger.sqlite3")))
    gateway = build_gateway(config)
    want = auto_price(0.5, first.prefill_tokens_per_s, first.decode_tokens_per_s, 0.25)
    got = gateway.tiers["small"].price
    assert (got.input, got.cached_input, got.output) == pytest.approx((want.input, want.cached_input, want.output))
    assert gateway.tiers["cloud"].price.cached_input == pytest.approx(0.25)  # input x cached_input_fraction
    err = capsys.readouterr().err
    assert f"tier small (local): ${want.input:.4g} in / ${want.cached_input:.4g} cached / ${want.output:.4g} out" in err
    assert "auto: $0.5/h" in err and "measured" not in err  # reused, not measured again
