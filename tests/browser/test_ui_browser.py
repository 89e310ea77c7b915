"""The ops page in a real browser: uvicorn on a free port, a fresh database with the scenario
applied through the ledger service, headless Chromium driven by Selenium.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/install-browser``). Selenium is given
both binaries explicitly, so selenium-manager never looks for (or downloads) anything. Saves a
screenshot of the instance page to ``test-artifacts/ui-instance.png``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.db import make_engine, upgrade
from ledger.settings import Settings
from tests.helpers.api import API_TOKENS, AT, READ_TOKEN, SCENARIO, live_server, seed
from worker.api import create_app

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-extensions",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--lang=en-US",
    "--window-size=1360,1000",
)

webdriver = pytest.importorskip("selenium.webdriver")

if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    # CI installs the browser (.ci/run calls .ci/install-browser), so there a missing browser is
    # a failure, never a silent skip; on a developer's machine it is a hint.
    message = f"{CHROMIUM} and {CHROMEDRIVER} are needed: run .ci/install-browser"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


@pytest.fixture
def server(tmp_path: Path, redis_url: str) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'ui.db'}"
    upgrade(url)
    engine = make_engine(url)
    seed(engine)
    engine.dispose()
    app = create_app(Settings(database_url=url, broker_url=redis_url, api_tokens=API_TOKENS))
    with live_server(app) as base_url:
        yield base_url
    app.state.api.engine.dispose()


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    # Belt and braces: Selenium Manager is skipped because both paths are given, and offline
    # mode makes sure it would not download anything if it ever ran.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_login_and_instance_page(server: str, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    def wait_for(condition) -> None:
        WebDriverWait(browser, 15).until(condition)

    instance_url = f"{server}/ui/instances/{SCENARIO.web}?at={AT}"
    browser.get(instance_url)
    # Not logged in: the login form, which brings us back to the page afterwards.
    assert "/ui/login" in browser.current_url
    browser.find_element(By.ID, "token").send_keys(READ_TOKEN)
    browser.find_element(By.ID, "login-submit").click()
    wait_for(ec.url_to_be(instance_url))
    wait_for(ec.presence_of_element_located((By.ID, "eligibility-badge")))

    # The cookie is HttpOnly: invisible to scripts.
    assert browser.execute_script("return document.cookie") == ""
    cookie = browser.get_cookie("quota_ledger_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert READ_TOKEN not in cookie["value"]  # a server-side session id, not the token

    badge = browser.find_element(By.ID, "eligibility-badge")
    assert badge.get_attribute("data-status") == "ineligible"
    assert "Ineligible" in badge.text and "不符合备案条件" in badge.text
    assert badge.value_of_css_property("color") != badge.value_of_css_property("background-color")

    reasons = browser.find_elements(By.CSS_SELECTOR, "#reasons .reason")
    assert [r.get_attribute("data-code") for r in reasons] == [
        "remaining_term_too_short",
        "no_public_bandwidth",
    ]
    first = reasons[0]
    assert (
        first.find_element(By.CLASS_NAME, "reason-zh").text == "包年包月的剩余时长已不满足备案要求"
    )
    assert first.find_element(By.CLASS_NAME, "reason-en").text == (
        "Less than 30 days of the subscription remain."
    )
    assert "Renew the subscription" in first.find_element(By.CLASS_NAME, "reason-fix").text
    second = reasons[1]
    assert second.find_element(By.CLASS_NAME, "reason-zh").text == "未开通公网带宽"
    assert "升降配" in second.find_element(By.CLASS_NAME, "reason-fix").text

    figures = {
        key: browser.find_element(By.ID, key).text
        for key in (
            "websites-used",
            "websites-reserved",
            "websites-remaining",
            "websites-cap",
            "subjects-used",
            "subjects-remaining",
            "subjects-cap",
        )
    }
    assert figures == {
        "websites-used": "1",
        "websites-reserved": "2",
        "websites-remaining": "2",
        "websites-cap": "5",
        "subjects-used": "1",
        "subjects-remaining": "4",
        "subjects-cap": "5",
    }
    # The bars are drawn: used (1 of 5) and reserved (2 of 5) segments of the websites bar.
    used = browser.find_element(By.CSS_SELECTOR, "#websites-bar .bar-used")
    reserved = browser.find_element(By.CSS_SELECTOR, "#websites-bar .bar-reserved")
    assert float(used.get_attribute("width")) == pytest.approx(20.0)
    assert float(reserved.get_attribute("width")) == pytest.approx(40.0)
    assert used.rect["width"] > 0

    rows = browser.find_elements(By.CSS_SELECTOR, "#service-numbers tbody tr")
    assert [row.find_element(By.TAG_NAME, "td").text for row in rows] == [
        SCENARIO.used_number,
        *SCENARIO.reserved_numbers,
    ]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline .tl-item")) == 7
    assert "no_public_bandwidth" in browser.find_element(By.CSS_SELECTOR, ".tl-rejected").text

    # Full-page screenshot: grow the window to the document's height first.
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1360, min(int(height) + 40, 6000))
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / "ui-instance.png"
    assert browser.save_screenshot(str(target))
    assert target.stat().st_size > 10_000

    # The search box leads to the service number page, and back to the instance.
    browser.set_window_size(1360, 1000)
    search = browser.find_element(By.ID, "top-q")
    search.send_keys(SCENARIO.used_number)
    search.submit()
    wait_for(ec.url_matches(f"/ui/service-numbers/{SCENARIO.used_number}$"))
    assert browser.find_element(By.ID, "sn-status").text == "used"
    browser.find_element(By.LINK_TEXT, SCENARIO.web).click()
    wait_for(ec.url_matches(f"/ui/instances/{SCENARIO.web}$"))
    assert browser.find_element(By.ID, "instance-id").text == SCENARIO.web

    # Sign out (a same-origin form post, which the page's Origin check lets through): the
    # session is revoked on the server, so the old cookie value no longer opens the page.
    session = browser.get_cookie("quota_ledger_session")["value"]
    browser.find_element(By.CSS_SELECTOR, ".topbar-logout button").click()
    wait_for(ec.url_contains("/ui/login"))
    browser.add_cookie({"name": "quota_ledger_session", "value": session, "path": "/ui"})
    browser.get(instance_url)
    assert "/ui/login" in browser.current_url
