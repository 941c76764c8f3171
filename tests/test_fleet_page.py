"""The fleet page served by the motoko agent, in a real headless Chromium: it shows the hosts,
the routing (an OUT backend and why), the rollouts and the events; it updates by itself; it
shows a banner (and keeps the last data) while the view cannot be read; text from the network
stays text (never markup, never script).

Chromium is Debian's (``scripts/setup`` installs it), driven by Playwright from PyPI with that
executable (no ``playwright install``). Without Chromium or Playwright the browser tests skip,
unless ``LLM_AGENT_REQUIRE_BROWSER`` is set (``scripts/test`` and ``.ci/run`` set it): then
they fail. Screenshots go to ``$LLM_AGENT_ARTIFACTS`` when set, else ``tests/artifacts/``
(ignored by git).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from agent.fleet.api import FleetApi
from tests.fleetkit import fleet_api
from tests.test_fleet_report import report_data

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Dialog, Error, Page

TOKENS = {"gpu-1": "tok-gpu-1-secret", "gpu-2": "tok-gpu-2-secret", "motoko": "tok-motoko-secret"}
XSS = '<script>alert(1)</script><img src=x onerror=alert(2)> & "quoted"'
#: ``LLM_AGENT_CHROMIUM``: another Chromium binary (else Debian's, on the PATH).
CHROMIUM = os.environ.get("LLM_AGENT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The page polls every 2 s; a change must show within this.
UPDATE_MS = 5000


def artifacts() -> Path:
    where = Path(os.environ.get("LLM_AGENT_ARTIFACTS") or Path(__file__).parent / "artifacts")
    where.mkdir(parents=True, exist_ok=True)
    return where


class Source:
    """The gateway duty's ``status()`` as the page reads it, changeable and breakable."""

    def __init__(self, api: FleetApi) -> None:
        self.api = api
        self.fail: str | None = None
        now = time.time()
        self.extra: dict[str, Any] = {
            "fleet_api": api.url,
            "report_interval_s": 10.0,
            "routing_state": {
                "backends": {
                    "gpu-1": {
                        "in_routing": True,
                        "since": now - 600,
                        "why": "healthy",
                        "failures": 0,
                        "probe": "ready",
                        "load": {"running": 1.0, "waiting": 0.0},
                    },
                    "gpu-2": {
                        "in_routing": False,
                        "since": now - 42,
                        "why": f"3 consecutive failed probes: {XSS}",
                        "failures": 3,
                        "probe": "connection refused",
                        "load": None,
                    },
                },
                "events": [
                    {"at": now - 42, "backend": "gpu-2", "change": "out", "why": f"3 failed probes {XSS}"},
                    {"at": now - 900, "backend": "gpu-1", "change": "in", "why": "2 good probes"},
                ],
                "rounds": 321,
            },
            "drains": {
                "leases": [
                    {
                        "host": "gpu-1",
                        "backends": ["gpu-1"],
                        "state": "routed out",
                        "granted_at": now - 5,
                        "expires_at": now + 115,
                        "expires_in_s": 115.0,
                        "reason": f"vllm: image changed {XSS}",
                    }
                ],
                "waiting": [{"host": "gpu-2", "waiting_s": 12.0, "why": f"gpu-1 is drained by gpu-1 {XSS}"}],
            },
            "spend": {"budget_usd": 50.0, "spent_usd": 12.5, "period": "1mo"},
            "last_reload_check": {"ok": True, "detail": "serves 3 deployments", "seconds": 1.42},
        }

    def __call__(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError(self.fail)
        hosts = self.api.fleet()["hosts"]  # the real fleet view, from real reports
        stale_hosts = {"gpu-1": False}
        fleet = [{**h, "stale": stale_hosts[h["host"]]} if h["host"] in stale_hosts else h for h in hosts]
        fleet.append(
            {
                "host": "motoko-b",
                "reported": True,
                "role": "gateway",
                "stage": "failed",
                "stale": True,
                "health": XSS,
                "ready": False,
                "age_s": 95.0,
                "commit": "fedcba9876",
                "gpu": None,
                "load": None,
            }
        )
        return {"fleet": fleet, **copy.deepcopy(self.extra)}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FleetApi, Source]]:
    with fleet_api(tmp_path / "fleet.sqlite", TOKENS) as api:
        sent = httpx.post(
            f"{api.url}/v1/reports",
            content=json.dumps(report_data(sent_at=time.time())),
            headers={"Authorization": "Bearer tok-gpu-1-secret"},
            timeout=5,
        )
        assert sent.status_code == 200, sent.text
        source = Source(api)
        api.view_source = source
        yield api, source


def test_the_page_is_served_read_only_with_a_strict_policy(tmp_path: Path) -> None:
    with fleet_api(tmp_path / "fleet.sqlite", TOKENS) as api, httpx.Client(timeout=5) as http:
        page = http.get(f"{api.url}/")
        also = http.get(f"{api.url}/fleet?x=1")
        bare_view = http.get(f"{api.url}/v1/view").json()  # no view_source: the hosts alone
        posts = [http.post(f"{api.url}{p}", content=b"{}").status_code for p in ("/", "/fleet", "/v1/view")]
        api.view_source = lambda: {"fleet": [], "spend": None}
        view = http.get(f"{api.url}/v1/view").json()
    assert page.status_code == 200 and also.status_code == 200 and also.text == page.text
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'sha256-" in csp
    assert "unsafe" not in csp and "form-action 'none'" in csp
    html = page.text.lower()
    assert "<form" not in html and "post" not in html and "innerhtml" not in html
    assert "http://" not in html and "https://" not in html  # nothing loaded from elsewhere
    assert html.count("<script") == 1 and "<script src" not in html
    assert posts == [404, 404, 404]  # nothing on this page writes
    assert [h["host"] for h in bare_view["fleet"]] == ["gpu-1", "gpu-2", "motoko"] and bare_view["now"] > 0
    assert view["fleet"] == [] and view["spend"] is None and view["now"] > 0


def test_a_failing_view_source_is_a_503_with_one_line(tmp_path: Path) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("fleet database locked")

    with fleet_api(tmp_path / "fleet.sqlite", TOKENS) as api:
        api.view_source = broken
        r = httpx.get(f"{api.url}/v1/view", timeout=5)
        fleet = httpx.get(f"{api.url}/v1/fleet", timeout=5)
    assert r.status_code == 503 and "fleet database locked" in r.json()["error"]
    assert fleet.status_code == 200  # the rest of the API is unaffected


# ---------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append("chromium (apt-get install chromium; scripts/setup does)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if missing:
        reason = "no headless browser: " + ", ".join(missing) + " missing"
        if os.environ.get("LLM_AGENT_REQUIRE_BROWSER"):
            pytest.fail(reason + " (LLM_AGENT_REQUIRE_BROWSER is set)")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # Playwright gives the browser a fresh temporary profile (--user-data-dir) and removes it.
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Opened:
    """A page on the fleet page, recording any dialog (an executed alert) and console error."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("console", self._console)
        page.on("pageerror", self._error)

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def _error(self, error: Error) -> None:
        self.errors.append(str(error))


@pytest.fixture
def opened(browser: Browser, served: tuple[FleetApi, Source]) -> Iterator[Opened]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        o = Opened(page)
        page.goto(f"{served[0].url}/")
        page.wait_for_selector("#hosts table", timeout=UPDATE_MS)
        yield o
    finally:
        context.close()


def cell_texts(page: Page, row_selector: str) -> list[str]:
    texts: list[str] = page.locator(row_selector).first.locator("td").all_inner_texts()
    return texts


@pytest.mark.slow
def test_the_page_shows_hosts_routing_rollouts_and_events_with_reasons_as_text(
    opened: Opened, served: tuple[FleetApi, Source]
) -> None:
    page = opened.page
    hosts = page.locator("#hosts tbody tr")
    assert [hosts.nth(i).get_attribute("data-host") for i in range(hosts.count())] == [
        "gpu-1",
        "gpu-2",
        "motoko",
        "motoko-b",
    ]
    gpu1 = cell_texts(page, '#hosts tr[data-host="gpu-1"]')
    assert gpu1[:4] == ["gpu-1", "gpu_node", "0123abc", "ready"] and gpu1[6] == "no"
    assert "NVIDIA H200" in gpu1[7] and gpu1[8] == "1 running / 0 waiting"
    assert "never reported" in cell_texts(page, '#hosts tr[data-host="gpu-2"]')
    failed = cell_texts(page, '#hosts tr[data-host="motoko-b"]')
    assert failed[3] == "failed" and failed[4] == XSS and failed[5] == "95s" and failed[6] == "STALE"

    out = cell_texts(page, '#routing tr[data-backend="gpu-2"]')
    assert out[:3] == ["gpu-2", "OUT", f"3 consecutive failed probes: {XSS}"] and out[3].endswith("s ago")
    assert cell_texts(page, '#routing tr[data-backend="gpu-1"]')[1] == "in"
    assert "OUT of routing: gpu-2" in page.inner_text("#summary")

    drain = cell_texts(page, '#drains tr[data-drain="gpu-1"]')
    assert drain[2] == "routed out" and drain[4].startswith("in ") and drain[5] == f"vllm: image changed {XSS}"
    waiting = cell_texts(page, '#drains tr[data-drain="gpu-2"]')
    assert waiting[2] == "waiting" and waiting[5] == f"gpu-1 is drained by gpu-1 {XSS}"
    events = page.locator("#events tbody tr")
    assert events.count() == 2
    assert events.nth(0).locator("td").all_inner_texts()[2:] == ["gpu-2", "out", f"3 failed probes {XSS}"]
    spend = page.inner_text("#spend")
    assert "12.50 USD" in spend and "50.00 USD per 1mo" in spend and "25%" in spend

    # The reasons are text: no element was made from them, nothing ran.
    assert page.evaluate("document.scripts.length") == 1
    assert page.evaluate("document.images.length") == 0
    assert opened.dialogs == [] and opened.errors == []
    assert not page.locator("#error").is_visible()
    assert "updated" in page.inner_text("#updated")
    page.screenshot(path=str(artifacts() / "fleet-page.png"), full_page=True)


@pytest.mark.slow
def test_the_page_updates_by_itself_and_shows_a_banner_while_the_view_fails(
    opened: Opened, served: tuple[FleetApi, Source]
) -> None:
    from playwright.sync_api import expect

    page, (_, source) = opened.page, served
    page.evaluate("window.__same_document = true")  # gone if the page were reloaded
    backend = source.extra["routing_state"]["backends"]["gpu-2"]
    backend.update(in_routing=True, why="healthy", since=time.time(), failures=0)
    source.extra["routing_state"]["events"].insert(
        0, {"at": time.time(), "backend": "gpu-2", "change": "in", "why": "2 good probes"}
    )
    source.extra["drains"] = {"leases": [], "waiting": []}
    changed = time.monotonic()
    state = page.locator('#routing tr[data-backend="gpu-2"] td').nth(1)
    expect(state).to_have_text("in", timeout=UPDATE_MS)
    seen_after = time.monotonic() - changed
    assert page.locator("#events tbody tr").count() == 3
    assert page.inner_text("#drains") == "no rollout in progress"
    assert "every backend in routing" in page.inner_text("#summary")
    assert page.evaluate("window.__same_document") is True

    source.fail = "fleet database locked"
    banner = page.locator("#error")
    expect(banner).to_be_visible(timeout=UPDATE_MS)
    assert "503" in banner.inner_text() and "fleet database locked" in banner.inner_text()
    assert "showing the data of" in banner.inner_text()
    assert page.locator("#hosts tbody tr").count() == 4  # the last data is kept
    page.screenshot(path=str(artifacts() / "fleet-page-error.png"), full_page=True)

    source.fail = None
    expect(banner).to_be_hidden(timeout=UPDATE_MS)
    assert page.evaluate("window.__same_document") is True
    assert opened.dialogs == []
    # The failed fetches are the only console errors (Chromium logs each 503 it receives).
    assert all("503" in e for e in opened.errors), opened.errors
    print(f"update seen {seen_after:.2f} s after the data changed")
