"""The page at / in a real browser: headless Chromium (Debian's package, driven by Selenium through the system
chromedriver: nothing is downloaded) types a message, sees the reply stream in, and sees the expert cache view
change. Skipped, with the reason, only where no Chromium can be had (scripts/setup_env.sh installs it as root).

With ROTARY_SERVER_SCREENSHOT=PATH the page is also saved there as PNG (benchmarks/server-page.png is one)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CTX = 1024


def _chromium() -> tuple[str, str] | None:
    browser = next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if Path(p).exists()), None)
    return (browser, driver) if browser and driver else None


FOUND = _chromium()
pytestmark = pytest.mark.skipif(FOUND is None, reason="no Chromium and chromedriver here (Debian: apt-get install "
                                                      "chromium chromium-driver; scripts/setup_env.sh does it as root)")


@pytest.fixture
def server(small_model: Path, slot_budget) -> Iterator[str]:
    """`rotary serve` on the small model (12 layers of 32 experts, 8 slots each on the CPU stand-in)."""
    command = [sys.executable, "-m", "rotary_gguf", "serve", str(small_model), "--port", "0", "--placement", "rotary",
               "--profile", "rtx4060-laptop-8gb", "--vram-budget", f"{slot_budget(small_model, 8, CTX)}B",
               "--ctx", str(CTX), "--alias", "small-moe"]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "ROTARY_SCHED_DEVICE": "cpu"})
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "at http://" in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert ready.wait(120) and proc.poll() is None, "".join(lines)
        yield re.search(r"at (http://127\.0\.0\.1:\d+)/", "".join(lines)).group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert FOUND is not None
    options = webdriver.ChromeOptions()
    options.binary_location = FOUND[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1440,960", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=FOUND[1]), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _rows(driver) -> dict[str, tuple[str, str]]:
    """Each layer row of the cache view: (experts in slots, hits)."""
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#cache .layer')]"
        ".map(r => [r.dataset.layer, [r.dataset.resident, r.dataset.hits]]))")


def _until(condition, timeout: float = 60, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting in the page")


def test_typing_a_message_streams_the_reply_and_moves_the_cache_view(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server + "/")
    rows = _until(lambda: _rows(browser) if len(_rows(browser)) == 12 else None)
    assert "small-moe" in browser.find_element(By.ID, "model").text
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("200")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("Which experts does this model use for a question about cooking?")
    prompt.send_keys(Keys.ENTER)

    reply = "document.querySelector('.msg.assistant')"
    lengths = set()

    def done() -> bool:
        lengths.add(browser.execute_script(f"const m = {reply}; return m ? m.firstChild?.length || 0 : 0"))
        return browser.execute_script(f"const m = {reply}; return !!m && m.classList.contains('done')")

    _until(done, every=0.005)
    text = browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text.startswith("Which experts")
    assert len(text) > 0 and "tokens" in text and "cached" in text
    assert len(lengths - {0}) >= 2, lengths  # the text arrived in pieces, not at once
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    after = _until(lambda: (r := _rows(browser)) != rows and r)  # the view follows the engine
    assert any(after[layer] != rows[layer] for layer in rows)
    lit = browser.execute_script("return [...document.querySelectorAll('#cache .layer')]"
                                 ".map(r => [r.dataset.resident, r.querySelectorAll('.cell.slot').length])")
    assert all(0 < n == len(resident.split(",")) <= 8 for resident, n in lit), lit  # 8 slots of 32 per layer
    assert re.search(r"\d+(\.\d)?%", browser.find_element(By.ID, "summary").text)
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if keep := os.environ.get("ROTARY_SERVER_SCREENSHOT"):
        shutil.copyfile(shot, keep)
