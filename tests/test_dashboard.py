"""GET /dashboard: the page is public and self-contained, its data needs the key, and in a real headless browser
(Debian's chromium through chromedriver) the numbers on the page move when traffic arrives."""
from __future__ import annotations

import os
import re
import shutil
import time

import httpx
import pytest

from thrifty.config import CacheSettings, PriceSettings, RouterSettings, ServerSettings, ThriftyConfig, TierSettings
from thrifty.gateway.cache import ResponseCache
from thrifty.gateway.cache.embedded import EmbeddedStore
from thrifty.gateway.tiers import build_gateway, check_tiers
from thrifty.server.app import create_gateway_app
from thrifty.server.background import ServerThread

KEY = "sk-dashboard-test"
ENGINE = dict(dtype="float32", num_kv_blocks=256, block_size=16)


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    """Two priced local tiers (the router keeps the cheap one, so routing saves against the large one's price),
    an exact response cache (repeats cost nothing), and an API key."""
    tmp = tmp_path_factory.mktemp("dashboard")
    config = ThriftyConfig(
        model_list=[TierSettings("small", str(tiny_gguf), dict(ENGINE), price=PriceSettings(1.0, 0.5, 2.0)),
                    TierSettings("large", str(tiny_gguf), dict(ENGINE), price=PriceSettings(10.0, 5.0, 20.0))],
        router=RouterSettings(retries=0),
        server=ServerSettings(max_output_tokens=256, ledger_path=str(tmp / "ledger.sqlite3")))
    gateway = build_gateway(config, check_tiers(config))
    cache = ResponseCache(EmbeddedStore(tmp / "responses.sqlite3"), timeout_s=2.0)
    app = create_gateway_app(gateway, config.server, api_key=KEY, cache=cache, cache_settings=CacheSettings())
    with ServerThread(app) as srv:
        yield srv


def ask(server, question: str, max_tokens: int = 12) -> httpx.Response:
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "auto", "messages": [{"role": "user", "content": question}],
                         "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r


def traffic(server, questions=("What is a list?", "What is a dict?", "What is a set?")) -> None:
    for q in questions:
        ask(server, q)
    time.sleep(0.3)                         # the cache stores in the background
    for q in questions:
        assert ask(server, q).headers["x-thrifty-cache"] == "hit"


def data(server) -> dict:
    r = httpx.get(server.url + "/v1/thrifty/dashboard", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    return r.json()


def test_page_is_public_and_self_contained_data_needs_the_key(server):
    page = httpx.get(server.url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)        # no external assets
    assert httpx.get(server.url + "/v1/thrifty/dashboard").status_code == 401
    before = data(server)
    traffic(server, ("Name a prime.", "Name a color."))
    after = data(server)
    assert after["requests"] == before["requests"] + 4
    assert after["completion_tokens"] > before["completion_tokens"]
    assert after["response_cache"]["hit"] == before["response_cache"]["hit"] + 2
    assert after["tiers"]["small"] >= 4 and after["tiers"]["large"] == 0
    assert after["cost"]["saved_routing_usd"] > 0 and after["cost"]["saved_cache_usd"] > 0
    assert after["cost"]["saved_usd"] == pytest.approx(after["cost"]["baseline_usd"] - after["cost"]["spent_usd"])
    assert after["ttft_ms"]["p50"] > 0 and after["kv_blocks_total"] == 2 * ENGINE["num_kv_blocks"]


def _chrome():
    """A headless chromium through Debian's chromedriver; skipped off CI when it is not installed (make test
    installs it), a failure on CI."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        message = "chromium and chromedriver are not installed (make test installs them: apt-get install chromium " \
                  "chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1300"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


def test_the_page_in_a_real_browser_shows_the_numbers_move(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chrome()
    try:
        browser.get(server.url + "/dashboard?interval_ms=250")
        wait = WebDriverWait(browser, 30, poll_frequency=0.1)
        text = lambda id_: browser.find_element(By.ID, id_).text                      # noqa: E731
        wait.until(lambda b: b.find_element(By.ID, "key-form").is_displayed())      # no key yet: it asks
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "key-save").click()
        wait.until(lambda b: text("requests") != "-")
        requests_before, tokens_before = _number(text("requests")), _number(text("tokens"))
        traffic(server)
        wait.until(lambda b: _number(text("requests")) >= requests_before + 6)
        wait.until(lambda b: _number(text("tokens")) > tokens_before and _number(text("tok-rate")) > 0)
        assert _number(text("req-rate")) > 0 and _number(text("ttft-p50")) > 0
        assert text("saved-routing").startswith("$") and _number(text("saved-routing")) > 0
        assert _number(text("saved-cache")) > 0 and "small" in text("tiers")
        assert not browser.find_element(By.ID, "key-form").is_displayed()
        shot = os.environ.get("THRIFTY_DASHBOARD_SCREENSHOT") or str(tmp_path / "dashboard.png")
        assert browser.save_screenshot(shot)
    finally:
        browser.quit()


def _number(text: str) -> float:
    m = re.search(r"-?[0-9][0-9,]*\.?[0-9]*(e-?[0-9]+)?", text)
    return float(m.group(0).replace(",", "")) if m else 0.0
