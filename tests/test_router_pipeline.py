"""The router's whole offline pipeline through the CLI on tiny random models: label -> train -> calibrate ->
bench router. A random model never passes a unit test, so the labels are edited to give both outcomes; the
point here is the plumbing and the report's shape, the real numbers come from `thrifty bench router`."""
from __future__ import annotations

import json

import pytest

from thrifty.cli import main


def test_label_train_calibrate_bench(tiny_gguf, tmp_path, capsys):
    # MiniLM comes from the zoo (make install pulls it); the router's files go to tmp_path
    classifier, calibration = tmp_path / "classifier.json", tmp_path / "calibration.json"
    files = ["--classifier", str(classifier), "--calibration", str(calibration)]
    labels = tmp_path / "labels.json"
    assert main(["router", "label", "--problems", "0-11", "--small", str(tiny_gguf), "--large", str(tiny_gguf),
                 "--max-tokens", "4", "--out", str(labels)]) == 0
    data = json.loads(labels.read_text())
    small, large = data["tiers"]
    assert [a["index"] for a in small["attempts"]] == list(range(12))
    assert small["prefill_tokens_per_s"] > 0 and small["decode_tokens_per_s"] > 0
    assert not any(a["passed"] for a in small["attempts"])          # a random model passes nothing
    for a in small["attempts"]:                                     # pretend: even problems pass on small
        a["passed"] = a["index"] % 2 == 0
    for a in large["attempts"]:
        a["passed"] = True
    labels.write_text(json.dumps(data))

    assert main(["router", "train", "--labels", str(labels), "--out", str(classifier)]) == 0
    out = capsys.readouterr().out
    assert "trained on 12 problems (6 the small tier fails)" in out
    assert classifier.exists()

    assert main(["router", "calibrate", "--labels", str(labels), "--target-quality", "0.9", *files]) == 0
    out = capsys.readouterr().out
    assert "classifier: threshold" in out and "cascade/code+logprob: threshold" in out
    assert json.loads(classifier.read_text())["threshold"] is not None
    assert set(json.loads(calibration.read_text())) == {"cascade:code+logprob"}

    report_path = tmp_path / "router.json"
    assert main(["bench", "router", "--problems", "100-103", "--small", str(tiny_gguf), "--large", str(tiny_gguf),
                 "--max-tokens", "4", *files, "--json", str(report_path), "--plot", str(tmp_path / "router.png")]) == 0
    report = json.loads(report_path.read_text())
    results = {r["strategy"]: r for r in report["results"]}
    assert set(results) == {"small-only", "large-only", "classifier", "cascade", "oracle"}
    for r in results.values():
        assert r["problems"] == 4 and r["pass_at_1"] == 0.0 and r["cost_usd"] > 0
    # nothing passes, so the oracle takes the cheaper tier and the cascade escalates every cut-off answer
    assert results["oracle"]["cost_usd"] <= min(results["small-only"]["cost_usd"], results["large-only"]["cost_usd"])
    assert results["cascade"]["paid_twice"] == 1.0
    assert results["cascade"]["cost_usd"] == pytest.approx(
        results["small-only"]["cost_usd"] + results["large-only"]["cost_usd"])
    assert set(report["seed_prices"]) == {"8B -> 70B", "8B -> cloud"}
    assert (tmp_path / "router.png").stat().st_size > 0


def test_bench_router_refuses_without_a_classifier(tmp_path, capsys):
    assert main(["bench", "router", "--problems", "100-101", "--classifier", str(tmp_path / "none.json")]) == 2
    assert "no router classifier" in capsys.readouterr().err
