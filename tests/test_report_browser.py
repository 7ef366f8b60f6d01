"""The report of a quick run, read in a real browser (headless Debian Chromium through Selenium).

The page loads from ``file://`` with the network switched off, logs no console error, every
``<img>`` decodes, every in-page link has its target, the model cards are on the first screen,
and the page never scrolls sideways at 1280 px and at 700 px. A full-page screenshot at each
width is written beside the report for people to look at. Skipped, with the reason, only where
Chromium or its driver is not installed (``make browser`` installs them; CI does).
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WIDTHS = (1280, 700)
FIRST_SCREEN_PX = 800


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("Chromium and chromedriver are not installed: apt-get install chromium chromium-driver (make browser)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _viewport(driver: Any, width: int, height: int = 900) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    )


def _full_page_png(driver: Any, width: int, path: Path) -> None:
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    _viewport(driver, width, min(height, 16_000))
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))
    _viewport(driver, width)


def test_report_in_chromium_offline(quick_run: tuple[Path, CompletedProcess[str]], browser: Any) -> None:
    out, result = quick_run
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.html").resolve()
    n_png = len(list((out / "images").glob("*.png")))
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    _viewport(browser, WIDTHS[0])
    browser.get(report.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.title == "redblue report"

    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert errors == [], errors
    # Nothing was fetched: every image is inline, nothing else is loaded.
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert [u for u in fetched if not u.startswith(("data:", "file:"))] == []

    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])"
    )
    assert len(images) == n_png >= 8
    broken = [alt for alt, complete, w, h in images if not (complete and w > 0 and h > 0)]
    assert broken == [], f"images that did not decode: {broken}"

    missing = browser.execute_script(
        "return Array.from(document.querySelectorAll('a[href^=\"#\"]'))"
        ".map(a => a.getAttribute('href').slice(1)).filter(id => !document.getElementById(id))"
    )
    assert missing == [], f"in-page links without a target: {missing}"

    cards = browser.execute_script(
        "return Array.from(document.querySelectorAll('.card')).map(c => [c.id, c.getBoundingClientRect().top])"
    )
    assert {card_id for card_id, _ in cards} >= {"model-baseline", "model-advtrain", "model-poisoned"}
    assert cards[0][1] < FIRST_SCREEN_PX, "the first model card is not on the first screen"
    # Every fired warning links to its explanation, which is in the page.
    unlinked = browser.execute_script(
        "return Array.from(document.querySelectorAll('.warn-box'))"
        ".filter(b => !b.querySelector('a[href^=\"#check-\"]')).map(b => b.textContent)"
    )
    assert unlinked == [], unlinked

    for width in WIDTHS:
        _viewport(browser, width)
        browser.get(report.as_uri())
        scroll, client = browser.execute_script(
            "const d = document.documentElement; return [d.scrollWidth, d.clientWidth]"
        )
        assert scroll <= client, f"horizontal scroll at {width} px: page {scroll} px wide in {client} px"
        shot = out / f"report_{width}px.png"
        _full_page_png(browser, width, shot)
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
