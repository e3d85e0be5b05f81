"""The token panel (`/_gateway/panel/`) in a real browser: headless Chromium driven by Selenium.

The gateway and the recording upstream run in a thread of their own (their own event loop), so
the blocking WebDriver calls of a test never stall them. Every test starts with empty browser
storage. With PANEL_SCREENSHOTS=<dir> the tests also save screenshots of the main screens there
(the README shows the ones in docs/panel/).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from gateway.config import build_settings
from gateway.panel import CSP, STATIC
from gateway.server import GatewayServer

from support.gateways import base_config
from support.keys import MASTER_KEY
from support.servers import Upstream, running_upstream

PANEL = "/_gateway/panel/"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1280,900")
XSS = "<img src=x onerror=window.__pwned=1>"


class Site:
    """A gateway in front of the recording upstream, both served from a background thread."""

    def __init__(self, redis_url: str, **overrides: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="panel-site", daemon=True)
        self.stack = AsyncExitStack()
        self.prefix = "{gwpanel-" + uuid.uuid4().hex[:12] + "}:"
        self.redis_url = redis_url
        self.overrides = overrides
        self.url = ""
        self.upstream: Upstream | None = None

    def run(self, job: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(job, self.loop).result(60)

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())
        self.wait_for_master()

    async def _start(self) -> None:
        self.upstream = await self.stack.enter_async_context(running_upstream())
        settings = build_settings(base_config(self.upstream.url, self.redis_url, self.prefix, **self.overrides))
        server = GatewayServer(settings)
        await server.start("127.0.0.1", 0)
        self.stack.push_async_callback(server.close)
        self.url = f"http://127.0.0.1:{server.port}"

    def stop(self) -> None:
        self.run(self.stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def wait_for_master(self) -> None:
        deadline = time.monotonic() + 10
        while self.call("GET", "/auth/info")[0] != 200:
            assert time.monotonic() < deadline, "the bootstrap master token never became usable"
            time.sleep(0.05)

    def call(self, method: str, path: str, key: str | None = MASTER_KEY, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        """One request from the test itself (not the browser): status, JSON body (or text), headers."""
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"FlespiToken {key}"
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            sent["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, raw, got = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as refused:
            status, raw, got = refused.code, refused.read(), dict(refused.headers)
        try:
            return status, json.loads(raw), got
        except ValueError:
            return status, raw.decode("utf-8", "replace"), got

    def create(self, **fields: Any) -> dict[str, Any]:
        fields.setdefault("ttl", 3600)
        status, body, _ = self.call("POST", "/platform/tokens", body=[fields])
        assert status == 200, body
        token: dict[str, Any] = body["result"][0]
        return token

    def token(self, token_id: int) -> dict[str, Any] | None:
        status, body, _ = self.call("GET", f"/platform/tokens/{token_id}")
        assert status == 200, body
        return body["result"][0] if body["result"] else None


@pytest.fixture(scope="module")
def site(redis_url: str) -> Iterator[Site]:
    served = Site(redis_url)
    served.start()
    yield served
    served.stop()


def found_binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"{names[0]} is not installed (.ci/run installs it)")  # never a skip: CI must run this


@pytest.fixture(scope="module")
def chrome() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = found_binary("chromium", "chromium-browser")
    with tempfile.TemporaryDirectory(prefix="gw-panel-chromium-") as profile:
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, CSP violations
        driver = webdriver.Chrome(options=options, service=Service(executable_path=found_binary("chromedriver")))
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture
def browser(chrome: WebDriver, site: Site) -> WebDriver:
    """The shared browser with this site's storage emptied: every test starts logged out."""
    chrome.get(site.url + PANEL)
    chrome.execute_script("sessionStorage.clear(); localStorage.clear();")
    chrome.get("about:blank")
    return chrome


# -- helpers ------------------------------------------------------------------------------------

def until(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str, timeout: float = 15) -> Any:
    try:
        # Stale elements: a view re-rendered between finding an element and reading it; ask again.
        return WebDriverWait(driver, timeout, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        messages = [text(driver, "#notice"), text(driver, "#problem")]
        raise AssertionError(f"timed out waiting for {what}; messages: {messages}") from None


def text(driver: WebDriver, selector: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def element(driver: WebDriver, selector: str) -> WebElement:
    return until(driver, lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed()),
                                        None), selector)


def click(driver: WebDriver, selector: str) -> None:
    element(driver, selector).click()


def button(driver: WebDriver, label: str, within: WebElement | None = None) -> WebElement:
    """A visible button or button-styled link by its visible text."""
    def find(d: WebDriver) -> WebElement | None:
        scope = within or d
        candidates = scope.find_elements(By.CSS_SELECTOR, "button, a.button, a")
        return next((c for c in candidates if c.is_displayed() and c.text.strip() == label), None)
    found: WebElement = until(driver, find, f"button {label!r}")
    return found


def typed(field: WebElement, value: str) -> None:
    field.clear()
    field.send_keys(value)


def labelled(driver: WebDriver, label: str, within: WebElement | None = None) -> WebElement:
    """The control a visible <label for> with this text names: how a screen reader finds it."""
    def find(d: WebDriver) -> WebElement | None:
        for candidate in (within or d).find_elements(By.CSS_SELECTOR, "label[for]"):
            if candidate.is_displayed() and candidate.text.strip() == label:
                return d.find_element(By.ID, candidate.get_attribute("for"))
        return None
    found: WebElement = until(driver, find, f"control labelled {label!r}")
    return found


def notice(driver: WebDriver, words: str) -> str:
    return str(until(driver, lambda d: words in text(d, "#notice") and text(d, "#notice"), f"notice {words!r}"))


def problem(driver: WebDriver, words: str) -> str:
    return str(until(driver, lambda d: words in text(d, "#problem") and text(d, "#problem"), f"problem {words!r}"))


def log_in(driver: WebDriver, site: Site, key: str = MASTER_KEY) -> None:
    driver.get(site.url + PANEL)
    typed(element(driver, "#login-key"), key)
    click(driver, "form.login button[type=submit]")
    until(driver, lambda d: d.find_element(By.ID, "session").is_displayed(), "the session header")


def token_rows(driver: WebDriver) -> dict[int, list[str]]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#token-list tbody tr[data-id]")
    return {int(row.get_attribute("data-id")): [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in rows}


def shot(driver: WebDriver, name: str, full: bool = False) -> None:
    """Save a screenshot when PANEL_SCREENSHOTS names a directory (the README's come from here);
    `full`: the whole page, the window stretched to its height for the picture."""
    folder = os.environ.get("PANEL_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    size = driver.get_window_size()
    if full:
        height = driver.execute_script("return document.documentElement.scrollHeight;")
        driver.set_window_size(size["width"], min(int(height) + 140, 4000))
    driver.execute_script("window.scrollTo(0, 0);")
    driver.save_screenshot(str(Path(folder) / f"{name}.png"))
    if full:
        driver.set_window_size(size["width"], size["height"])


def storage(driver: WebDriver) -> dict[str, Any]:
    found: dict[str, Any] = driver.execute_script(
        "return {session: Object.assign({}, sessionStorage), local: Object.assign({}, localStorage)};")
    return found


def console_errors(driver: WebDriver) -> list[str]:
    """Console errors since the last call, but the failed fetches a test provoked on purpose (4xx)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"
            and "the server responded with a status of 4" not in entry["message"]]


UNLABELLED = """
const named = (el) => (el.labels && el.labels.length && [...el.labels].some((l) => l.textContent.trim()))
  || (el.getAttribute('aria-label') || '').trim() || (el.getAttribute('aria-labelledby') || '').trim();
const shown = (el) => el.getClientRects().length > 0;
const controls = [...document.querySelectorAll('input, select, textarea')].filter(shown).filter((el) => !named(el));
const buttons = [...document.querySelectorAll('button, a[href]')].filter(shown)
  .filter((el) => !el.textContent.trim() && !(el.getAttribute('aria-label') || '').trim());
return [...controls, ...buttons].map((el) => el.outerHTML.slice(0, 120));
"""


def unlabelled(driver: WebDriver) -> list[str]:
    """Visible controls a screen reader could not name (no <label for>, no aria-label, no text)."""
    found: list[str] = driver.execute_script(UNLABELLED)
    return found


def upstream_paths(site: Site) -> list[tuple[str, str]]:
    assert site.upstream is not None
    return [(r.method, r.raw_path) for r in site.upstream.requests]


# -- the tests ----------------------------------------------------------------------------------

def test_login_form_lists_tokens_and_searches(browser: WebDriver, site: Site) -> None:
    mine = site.create(info=f"search me {uuid.uuid4().hex[:6]}", ttl=7200)
    browser.get(site.url + PANEL)
    shot(browser, "login")
    typed(labelled(browser, "Token key"), MASTER_KEY)
    labelled(browser, "Token key").send_keys(Keys.ENTER)  # the keyboard submits the form
    until(browser, lambda d: mine["id"] in token_rows(d), "the token list")
    assert MASTER_KEY not in browser.current_url
    assert browser.current_url.endswith(PANEL + "#/tokens")
    kept = storage(browser)
    assert MASTER_KEY in kept["session"].values() and MASTER_KEY not in json.dumps(kept["local"])
    rows = token_rows(browser)
    assert rows[1][:3] == ["1", "bootstrap master token", "Master"]
    assert rows[mine["id"]][1:6] == [mine["info"], "Standard", "TTL 2 hours", "never", ""]
    shot(browser, "tokens")
    browser.refresh()  # the tab keeps its session: the key is checked again, not asked for
    until(browser, lambda d: mine["id"] in token_rows(d), "the list after a reload")

    typed(labelled(browser, "Search"), mine["info"].split()[-1])
    until(browser, lambda d: list(token_rows(d)) == [mine["id"]], "the search to keep one token")
    assert text(browser, "#token-count") == f"1 of {len(rows)} tokens"
    typed(labelled(browser, "Search"), "no such token anywhere")
    until(browser, lambda d: not token_rows(d), "the search to keep none")
    assert "No token matches." in text(browser, "#token-list")


def test_template_token_acl_proxy_logs_delete_and_restore(browser: WebDriver, site: Site) -> None:
    log_in(browser, site)
    button(browser, "New token").click()
    until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "button.template")) == 5, "the templates")
    assert [b.text for b in browser.find_elements(By.CSS_SELECTOR, "button.template")] == [
        "toolbox", "setbox", "trackit", "support", "mqtt-messages"]
    shot(browser, "templates")
    click(browser, "button[data-template=trackit]")
    typed(labelled(browser, "Device id"), "7")
    typed(labelled(browser, "Info"), "tracker for 7")
    button(browser, "Create token").click()

    # The key, shown this once, and copied with the button.
    key_field = element(browser, "#new-key")
    key = key_field.get_attribute("value")
    assert len(key) == 64 and key.isalnum()
    token_id = int(text(browser, "#created-title").split()[1])
    assert site.token(token_id)["access"]["acl"][0]["ids"] == [7]
    permissions = ["clipboardReadWrite", "clipboardSanitizedWrite"]
    browser.execute_cdp_cmd("Browser.grantPermissions", {"origin": site.url, "permissions": permissions})
    click(browser, "#copy-key")
    until(browser, lambda d: text(d, "#copy-state") == "Copied.", "the copy confirmation")
    assert browser.execute_async_script("navigator.clipboard.readText().then(arguments[0]);") == key
    shot(browser, "key-once")
    assert key not in browser.current_url

    # Open it: the ACL the template made, edited to allow the settings submodule (GET, PUT).
    click(browser, "#open-token")
    entry = element(browser, "fieldset.acl-entry")
    assert entry.find_element(By.CSS_SELECTOR, "input.acl-uri").get_attribute("value") == "gw/devices"
    assert entry.find_element(By.CSS_SELECTOR, "input.acl-ids").get_attribute("value") == "7"
    assert [i.get_attribute("value") for i in entry.find_elements(By.CSS_SELECTOR, "input.sub-name")] == [
        "messages", "telemetry"]
    assert key not in browser.page_source  # the key left the page with the key screen
    button(browser, "Add submodule", entry).click()
    third = entry.find_elements(By.CSS_SELECTOR, "fieldset.submodule")[2]
    typed(labelled(browser, "Name", third), "settings")
    labelled(browser, "PUT", third).click()
    # The other writable fields on the way: where from (IP, origins with a preset), metadata.
    typed(labelled(browser, "IP masks"), "127.0.0.1")
    labelled(browser, "Only these origins").click()
    button(browser, "Add preset").click()
    button(browser, f"Add this panel's origin ({site.url})").click()
    typed(labelled(browser, "Metadata (JSON object of strings)"), '{"owner": "ops"}')
    shot(browser, "edit-acl", full=True)
    click(browser, "#save-token")
    notice(browser, f"Token {token_id} saved.")
    saved = site.token(token_id)
    [entry_saved] = saved["access"]["acl"]
    assert entry_saved["submodules"][2] == {"name": "settings", "methods": ["GET", "PUT"]}
    assert (saved["ips"], saved["origins"], saved["metadata"]) == ("127.0.0.1", [{"preset": "flespi"}, site.url],
                                                                   {"owner": "ops"})
    assert (saved["info"], saved["ttl"], saved["enabled"]) == ("tracker for 7", 7 * 86400, True)  # as they were

    # The new key through the proxy: what the ACL allows reaches the upstream, the rest does not.
    assert site.call("PUT", "/gw/devices/7/settings", key, body={"x": 1})[0] == 200
    assert site.call("GET", "/gw/devices/8", key)[0] == 403
    assert ("PUT", "/gw/devices/7/settings") in upstream_paths(site)
    assert ("GET", "/gw/devices/8") not in upstream_paths(site)

    # The Logs tab: both requests, and a later one appears by itself (the tab refreshes).
    click(browser, "#tab-logs")

    def logs(driver: WebDriver) -> list[str]:  # read in one go: the table is redrawn as it refreshes
        rows: list[str] = driver.execute_script(
            "return [...document.querySelectorAll('#token-logs tbody tr')]"
            ".map((row) => [...row.cells].map((cell) => cell.textContent).join(' | '));")
        return rows

    until(browser, lambda d: any("PUT /gw/devices/7/settings | 200 |" in row for row in logs(d)), "the PUT in the logs")
    assert any("GET /gw/devices/8 | 403 |" in row for row in logs(browser))
    assert site.call("GET", "/gw/devices/7/messages", key)[0] == 200
    until(browser, lambda d: "GET /gw/devices/7/messages | 200 |" in logs(d)[-1], "the newest request, last")
    shot(browser, "logs")

    # Delete it (with a confirmation), see it refused, find it in the recycle bin, restore it.
    click(browser, "#tab-settings")
    click(browser, "#delete-token")
    click(browser, "#confirm-delete")
    notice(browser, f"Token {token_id} deleted")
    until(browser, lambda d: token_rows(d) and token_id not in token_rows(d), "the list without the token")
    assert site.call("GET", "/gw/devices/7", key)[0] == 401
    button(browser, "Recycle bin").click()
    restore = element(browser, f"#bin-list tr[data-id='{token_id}'] button.restore")
    assert "tracker for 7" in text(browser, f"#bin-list tr[data-id='{token_id}']")
    shot(browser, "recycle-bin")
    restore.click()
    notice(browser, f"Token {token_id} restored.")
    assert not browser.find_elements(By.CSS_SELECTOR, f"#bin-list tr[data-id='{token_id}']")
    assert site.call("GET", "/gw/devices/7", key)[0] == 200  # same id, same key
    button(browser, "Tokens").click()
    until(browser, lambda d: token_id in token_rows(d), "the restored token in the list")


def test_info_with_markup_stays_text(browser: WebDriver, site: Site) -> None:
    token = site.create(info=XSS)
    status, body, _ = site.call("POST", "/platform/subaccounts", body=[{"name": XSS}])
    assert status == 200, body
    log_in(browser, site)
    until(browser, lambda d: token["id"] in token_rows(d), "the token list")
    assert token_rows(browser)[token["id"]][1] == XSS
    assert XSS in [o.text for o in Select(element(browser, "#acting")).options][-1]
    click(browser, f"a[href='#/tokens/{token['id']}']")
    assert element(browser, "input.info").get_attribute("value") == XSS
    button(browser, "Subaccounts").click()
    until(browser, lambda d: XSS in text(d, "#account-list"), "the subaccount list")
    assert browser.find_elements(By.CSS_SELECTOR, "main img, header img") == []
    assert browser.execute_script("return window.__pwned;") is None
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018  (reading it is the check)
    assert console_errors(browser) == []


def test_panel_scripts_never_write_markup() -> None:
    """Data reaches the page only as text nodes and properties: no HTML-parsing sink is used at all."""
    sinks = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
             "setAttribute(\"on", "style=")
    for path in [*sorted(STATIC.rglob("*.js")), STATIC / "index.html"]:
        source = path.read_text()
        assert [sink for sink in sinks if sink in source] == [], path
    html = (STATIC / "index.html").read_text()
    assert "<script>" not in html and "<style" not in html and " style=" not in html  # CSP: nothing inline


def test_standard_and_acl_tokens_see_what_they_may(browser: WebDriver, site: Site) -> None:
    reader = site.create(info="a reader", access={"type": 0})
    log_in(browser, site, reader["key"])
    until(browser, lambda d: "a reader" in text(d, "dl.record"), "the token's own record")
    assert browser.current_url.endswith("#/me")
    assert "This is a standard token" in text(browser, "main")
    assert not browser.find_element(By.ID, "acting").is_displayed()  # no account to choose
    for section, path in (("Tokens", "platform/tokens"), ("Recycle bin", "platform/recycle-bin/tokens"),
                          ("Subaccounts", "platform/subaccounts")):
        button(browser, section).click()
        refusal = f"access to {path} (GET) is denied for standard token"
        until(browser, lambda d, refusal=refusal: refusal in text(d, ".denied"), f"the 403 of {section}")
        assert text(browser, ".denied").startswith("Not allowed for this token:")
        assert "need a master token" in text(browser, ".denied")
        if section == "Tokens":
            shot(browser, "standard-token")
    assert element(browser, "#session").is_displayed()  # a 403 does not end the session
    button(browser, "Log out").click()
    notice(browser, "Logged out.")

    acl = site.create(info="an acl one", access={"type": 2, "acl": [{"uri": "gw/devices", "methods": ["GET"]}]})
    log_in(browser, site, acl["key"])
    until(browser, lambda d: '"uri": "gw/devices"' in text(d, "pre.json"), "the token's ACL")
    button(browser, "Tokens").click()
    until(browser, lambda d: "access to platform/tokens (GET) is denied by token ACL" in text(d, ".denied"),
          "the 403 of the token list")

    noapi = site.create(info="no api", access={"type": 3})
    browser.get(site.url + PANEL)
    button(browser, "Log out").click()
    typed(element(browser, "#login-key"), noapi["key"])
    click(browser, "form.login button[type=submit]")
    problem(browser, "NOAPI token cannot be used for API requests")
    assert element(browser, "#login-key").is_displayed()
    assert console_errors(browser) == []


def test_login_with_a_link_takes_the_key_out_of_the_address(browser: WebDriver, site: Site) -> None:
    token = site.create(info="linked", access={"type": 1})
    browser.get(f"{site.url}{PANEL}#/token/{token['key']}")
    until(browser, lambda d: d.find_element(By.ID, "session").is_displayed(), "the session")
    assert token["key"] not in browser.current_url
    assert browser.current_url == f"{site.url}{PANEL}#/tokens"
    assert f"Token {token['id']}" in text(browser, "#who")
    assert token["key"] in storage(browser)["session"].values()
    assert token["key"] not in json.dumps(storage(browser)["local"])
    assert token["key"] not in browser.page_source
    button(browser, "Log out").click()
    assert token["key"] not in storage(browser)["session"].values()

    unknown = "Z" * 64
    browser.get(f"{site.url}{PANEL}#/token/{unknown}")
    problem(browser, "Login failed, the link's token was refused: invalid or expired access token")
    assert unknown not in browser.current_url and unknown not in json.dumps(storage(browser))
    assert element(browser, "#login-key").is_displayed()


def test_origin_of_the_panel_and_a_token_restricted_elsewhere(browser: WebDriver, site: Site) -> None:
    """Changes (POST, PUT, DELETE) carry Origin; the logged-in token must allow the panel's origin."""
    elsewhere = site.create(info="flespi only", access={"type": 1}, origins=[{"preset": "flespi"}])
    log_in(browser, site, elsewhere["key"])
    until(browser, lambda d: elsewhere["id"] in token_rows(d), "the list (a GET carries no Origin)")
    box = element(browser, f"#token-list tr[data-id='{elsewhere['id']}'] input.enabled")
    box.click()
    problem(browser, f"does not allow this panel's origin ({site.url})")
    assert "using token from unauthorized origin" in text(browser, "#problem")
    assert box.is_selected()  # put back: nothing changed
    assert site.token(elsewhere["id"])["enabled"] is True
    assert element(browser, "#session").is_displayed()  # not logged out: the key itself is fine

    # The panel's own origin in the token's origins: the same change goes through.
    origins = [site.url, {"preset": "flespi"}]
    assert site.call("PUT", f"/platform/tokens/{elsewhere['id']}", body={"origins": origins})[0] == 200
    target = site.create(info="switch me")
    browser.refresh()
    box = element(browser, f"#token-list tr[data-id='{target['id']}'] input.enabled")
    box.click()
    notice(browser, f"Token {target['id']} disabled.")
    assert site.token(target["id"])["enabled"] is False


def test_subaccounts_create_for_one_and_act_as_it(browser: WebDriver, site: Site) -> None:
    log_in(browser, site)
    button(browser, "Subaccounts").click()
    name = f"fleet {uuid.uuid4().hex[:6]}"
    typed(labelled(browser, "Name"), name)
    typed(labelled(browser, "API calls per window (empty: default)"), "5000")
    button(browser, "Create subaccount").click()
    created = notice(browser, f"({name}) created")
    sub = int(created.split()[1])
    assert "api_calls 5000" in text(browser, f"#account-list tr[data-id='{sub}']")
    shot(browser, "subaccounts")

    # A token for the subaccount, from the acting (own) account: "Create for subaccount".
    button(browser, "Tokens").click()
    button(browser, "New token").click()
    click(browser, "#custom-token")
    typed(labelled(browser, "Info"), "for the fleet")
    # A fixed end as well as the TTL; the date-time control is set as a script would (typing into
    # it depends on the browser's locale), then read by the form like any other value.
    expire_field = labelled(browser, "Expires at (local time; empty: no fixed end)")
    browser.execute_script("arguments[0].value = '2030-01-02T03:04:05';", expire_field)
    expire = browser.execute_script("return new Date('2030-01-02T03:04:05').getTime() / 1000;")
    Select(labelled(browser, "Create for subaccount")).select_by_visible_text(f"subaccount {sub} ({name})")
    button(browser, "Create token").click()
    element(browser, "#new-key")
    token_id = int(text(browser, "#created-title").split()[1])
    assert f"In subaccount {sub} ({name})." in text(browser, "section.created")
    assert site.token(token_id) is None  # not in the root account...
    status, body, _ = site.call("GET", f"/platform/tokens/{token_id}", headers={"x-flespi-cid": str(sub)})
    assert status == 200 and body["result"][0]["cid"] == sub  # ...but in the subaccount
    assert (body["result"][0]["expire"], body["result"][0]["ttl"]) == (expire, 30 * 86400)

    # Act as it: the panel's calls carry x-flespi-cid, so its token list is the subaccount's.
    click(browser, "#open-token")
    notice(browser, f"Acting as subaccount {sub} ({name}).")
    until(browser, lambda d: element(d, "input.info").get_attribute("value") == "for the fleet", "its token page")
    button(browser, "Tokens").click()
    until(browser, lambda d: list(token_rows(d)) == [token_id], "the subaccount's token list")
    button(browser, "New token").click()
    click(browser, "#custom-token")
    choices = [option.text for option in Select(labelled(browser, "Create for subaccount")).options]
    assert choices[:2] == [f"subaccount {sub} ({name}) (acting now)", "own account (0)"]
    Select(element(browser, "#acting")).select_by_value("")
    notice(browser, "Acting as own account (0).")
    element(browser, "button.template")  # the new-token view drawn again, for the account now acting
    button(browser, "Tokens").click()
    until(browser, lambda d: 1 in token_rows(d) and token_id not in token_rows(d), "the own account's list")
    assert console_errors(browser) == []


def test_keyboard_only_and_every_control_named(browser: WebDriver, site: Site) -> None:
    browser.get(site.url + PANEL)
    assert unlabelled(browser) == []
    active = browser.switch_to.active_element
    assert active.get_attribute("id") == "login-key"  # focus starts in the key field
    active.send_keys(MASTER_KEY, Keys.ENTER)
    until(browser, lambda d: 1 in token_rows(d), "the token list")
    assert unlabelled(browser) == []
    element(browser, "#token-search").send_keys(Keys.SHIFT, Keys.TAB)  # back from the search to "New token"
    assert browser.switch_to.active_element.text == "New token"
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    until(browser, lambda d: d.switch_to.active_element.get_attribute("data-template") == "toolbox",
          "focus on the first template")
    assert unlabelled(browser) == []
    browser.switch_to.active_element.send_keys(Keys.TAB)  # toolbox -> setbox
    assert browser.switch_to.active_element.get_attribute("data-template") == "setbox"
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    until(browser, lambda d: "template-item" in (d.switch_to.active_element.get_attribute("class") or ""),
          "focus on the device id")
    assert unlabelled(browser) == []
    browser.switch_to.active_element.send_keys("42", Keys.ENTER)
    until(browser, lambda d: d.switch_to.active_element.get_attribute("id") == "copy-key", "focus on Copy key")
    token_id = int(text(browser, "#created-title").split()[1])
    assert site.token(token_id)["info"] == "setbox for device 42"

    # The full form, with an ACL entry of each kind, is named throughout too.
    browser.get(f"{site.url}{PANEL}#/tokens/{token_id}")
    button(browser, "Add ACL entry").click()
    kind = Select(browser.switch_to.active_element)  # focus moved to the new entry's first control
    kind.select_by_value("mqtt")
    labelled(browser, "only these", element(browser, "fieldset.acl-entry")).click()
    click(browser, "input.origins-list")
    button(browser, "Add preset").click()
    assert unlabelled(browser) == []
    assert console_errors(browser) == []


def test_panel_files_carry_a_strict_policy(site: Site) -> None:
    status, page, headers = site.call("GET", PANEL, key=None)
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="js/main.js">' in page
    policy = headers["Content-Security-Policy"]
    assert policy == CSP
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'self'" and directives["frame-ancestors"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"  # nothing inline
    assert directives["form-action"] == "'none'" and directives["object-src"] == "'none'"
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    status, again, revalidated = site.call("GET", PANEL, key=None, headers={"If-None-Match": headers["ETag"]})
    assert status == 304 and again == "" and revalidated["Content-Security-Policy"] == CSP
    for name, kind in (("js/main.js", "text/javascript"), ("panel.css", "text/css"), ("icon.svg", "image/svg+xml")):
        status, _, headers = site.call("GET", PANEL + name, key=None)
        assert status == 200 and headers["Content-Type"].startswith(kind), name
        assert headers["Content-Security-Policy"] == CSP and headers["X-Content-Type-Options"] == "nosniff"
    # Only the panel's own files: anything else under it is a 404, with no token asked or forwarded.
    before = len(upstream_paths(site))
    for missing in ("js/nope.js", "..%2Fconfig.py", "static/index.html", "js/"):
        status, body, _ = site.call("GET", PANEL + missing, key=None)
        assert status in (400, 404), (missing, status, body)
        assert "errors" in body
    assert len(upstream_paths(site)) == before
    request = urllib.request.Request(site.url + PANEL.rstrip("/"), method="GET")
    opener = urllib.request.build_opener(NoRedirect())
    with pytest.raises(urllib.error.HTTPError) as redirected:
        opener.open(request, timeout=10)
    assert redirected.value.code == 308 and redirected.value.headers["Location"] == PANEL


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


async def test_panel_can_be_turned_off(make_gateway: Any, upstream: Upstream) -> None:
    gw = await make_gateway(panel={"enabled": False})
    for key in (None, MASTER_KEY):  # an unknown internal path now: never proxied
        assert await gw.call("GET", PANEL, key=key) == (404, {"errors": [{"code": 404,
                                                                         "reason": f"unknown path {PANEL}"}]})
    assert upstream.requests == []
    on = await make_gateway()
    async with on.request("GET", PANEL, key=None) as response:
        assert response.status == 200 and "Gateway tokens" in await response.text()


def test_custom_acl_token_every_field_errors_and_purge(browser: WebDriver, site: Site) -> None:
    log_in(browser, site)
    button(browser, "New token").click()
    skip = labelled(browser, "Don't auto-offer templates anymore")
    skip.click()
    notice(browser, "Templates will not be offered first anymore")
    assert storage(browser)["local"] == {"gw-panel.skip-templates": "1"}
    button(browser, "Cancel").click()
    button(browser, "New token").click()  # straight to the full form now, templates one click away
    form = element(browser, "form.token-form")
    assert browser.find_elements(By.CSS_SELECTOR, "button.template") == []
    button(browser, "Start from a template")  # present, for when one is wanted after all

    typed(labelled(browser, "Info"), "hand made")
    labelled(browser, "Enabled").click()
    Select(labelled(browser, "Access type")).select_by_value("2")
    button(browser, "Add ACL entry").click()
    first = form.find_elements(By.CSS_SELECTOR, "fieldset.acl-entry")[0]
    typed(labelled(browser, "URI", first), "gw/devices")
    labelled(browser, "DELETE", first).click()
    labelled(browser, "only these ids", first).click()
    typed(labelled(browser, "Item ids", first), "3, 4")
    labelled(browser, "none", first).click()
    button(browser, "Add ACL entry").click()
    second = form.find_elements(By.CSS_SELECTOR, "fieldset.acl-entry")[1]
    Select(labelled(browser, "Kind", second)).select_by_value("mqtt")
    typed(labelled(browser, "Topic", second), "message/gw/devices/3")
    labelled(browser, "publish", second).click()
    typed(labelled(browser, "TTL (after last use; empty: none)"), "2")
    Select(labelled(browser, "TTL unit")).select_by_visible_text("hours")
    typed(labelled(browser, "IP masks"), "010.0.0.1")  # refused by the gateway: reads two ways
    button(browser, "Create token").click()
    refused = problem(browser, "The gateway refused the input:")
    assert "ips:" in refused
    typed(labelled(browser, "IP masks"), "10.0.0.0/8, 127.0.0.1")
    button(browser, "Create token").click()
    element(browser, "#new-key")
    token_id = int(text(browser, "#created-title").split()[1])
    made = site.token(token_id)
    assert made["access"] == {"type": 2, "acl": [
        {"uri": "gw/devices", "methods": ["GET", "DELETE"], "ids": [3, 4], "submodules": []},
        {"uri": "mqtt", "topic": "message/gw/devices/3", "actions": ["publish", "subscribe"]}]}
    assert (made["info"], made["enabled"], made["ttl"], made["expire"], made["ips"], made["origins"]) == (
        "hand made", False, 7200, 0, "10.0.0.0/8, 127.0.0.1", "*")

    # Edit it back into a standard token: the ACL goes, the other fields stay.
    click(browser, "#open-token")
    Select(element(browser, "select.access-type")).select_by_value("0")
    assert not element(browser, "form.token-form").find_element(By.ID, "acl-editor").is_displayed()
    labelled(browser, "Enabled").click()
    click(browser, "#save-token")
    notice(browser, f"Token {token_id} saved.")
    changed = site.token(token_id)
    assert (changed["access"], changed["enabled"], changed["ttl"], changed["info"]) == ({"type": 0}, True, 7200,
                                                                                      "hand made")

    # Deleted, then purged from the recycle bin for good.
    assert site.call("DELETE", f"/platform/tokens/{token_id}")[0] == 200
    button(browser, "Recycle bin").click()
    button(browser, "Purge", element(browser, f"#bin-list tr[data-id='{token_id}']")).click()
    browser.switch_to.active_element.click()  # focus moved to the confirmation
    notice(browser, f"Token {token_id} purged.")
    status, body, _ = site.call("GET", f"/platform/recycle-bin/tokens/{token_id}")
    assert status == 200 and body["result"] == []
    entries = json.dumps(browser.get_log("browser"))
    assert MASTER_KEY not in entries and "FlespiToken" not in entries  # the key is never logged


def test_package_data_ships_every_panel_file() -> None:
    """pyproject's package-data globs (one directory level each) must cover every static file."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((STATIC.parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["gateway.panel"]
    for path in STATIC.rglob("*"):
        if path.is_file():
            relative = path.relative_to(STATIC.parent).as_posix()
            assert any(fnmatch.fnmatch(relative, p) and relative.count("/") == p.count("/") for p in patterns), relative


def test_a_token_refused_mid_session_logs_out(browser: WebDriver, site: Site) -> None:
    token = site.create(info="soon disabled", access={"type": 1})
    log_in(browser, site, token["key"])
    until(browser, lambda d: token["id"] in token_rows(d), "the list")
    assert site.call("PUT", f"/platform/tokens/{token['id']}", body={"enabled": False})[0] == 200
    button(browser, "Recycle bin").click()
    problem(browser, "Logged out: the token was refused (token is disabled).")
    assert element(browser, "#login-key").is_displayed() and not browser.find_element(By.ID, "session").is_displayed()
    assert token["key"] not in json.dumps(storage(browser))
