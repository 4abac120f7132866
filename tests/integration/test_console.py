"""The operator console (issue 11) on the real servers: its JSON endpoints (keys required, read-only
by default, redrive when BRIDGE_CONSOLE_WRITE allows) and the page itself in headless Chromium.

The bridges run in-process with a gateway; parked tasks are made over HTTP as a worker would (an
add with ``maxDeliveries: 1``, fetched and failed once). The browser test drives Debian's
``chromium`` through ``/usr/bin/chromedriver`` (``deploy/local/browser.sh`` installs both; ``make
test`` and ``.ci/run`` call it) from a thread, since the bridge serving the page runs on this
test's event loop. It saves a screenshot in tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.gateway.keys import new_key
from tests import raw_http
from tests.conftest import ENGINE_USER, OWNERS, ROOT, free_port, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "tests" / "artifacts"
UI_TIMEOUT = 20  # seconds for any one condition in the page (it polls every 2 s)


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    @property
    def result(self) -> Any:
        assert self.status == 200, (self.status, self.body)
        return self.body["result"]


class Client:
    """HTTP to one bridge's gateway: the console's JSON and the gateway's /api, with the test's keys."""

    def __init__(self, port: int, keys: dict[str, str], session: aiohttp.ClientSession) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.keys = keys
        self.session = session

    async def request(
        self, method: str, path: str, body: Any = None, *, key: str | None = "a", headers: dict[str, str] | None = None
    ) -> Reply:
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = f"Bearer {self.keys.get(key, key)}"
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            h["Content-Type"] = "application/json"
        async with self.session.request(method, self.base + path, data=data, headers=h) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode()
            return Reply(resp.status, parsed, resp.headers)

    async def console(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("GET" if body is None else "POST", "/console/api" + path, body, **kw)

    async def api(self, svc: str, name: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        reply = await self.request("POST", f"/api/queue/{svc}/{name}", {} if body is None else body, **kw)
        assert reply.status == 200, (name, reply.status, reply.body)
        return dict(reply.body)

    async def parked_task(self, svc: str, worker: str = "w-park") -> str:
        """A task parked by a worker's fail at its only delivery (maxDeliveries: 1)."""
        task_id = (await self.api(svc, "tasks", {"value": {"secret": "do-not-show"}, "maxDeliveries": 1}))["task"]["id"]
        got = await self.api(svc, "fetch", {"workerId": worker})
        assert got["task"]["id"] == task_id
        fail = {"workerId": worker, "taskId": task_id, "epoch": got["task"]["epoch"], "error": "boom"}
        assert (await self.api(svc, "fail", fail))["task"]["parked"] is True
        return str(task_id)

    async def counted(self, svc: str, **expected: int) -> dict[str, Any]:
        """The service's row in the console once its counts are ``expected`` (they are flushed ~1/s)."""

        async def row() -> dict[str, Any] | None:
            for s in (await self.console("/services")).result["services"]:
                if s["serviceId"] == svc and all(s[k] == v for k, v in expected.items()):
                    return dict(s)
            return None

        found: dict[str, Any] = await wait_for(row, 15, interval=0.2, what=f"{svc} counted as {expected}")
        return found

    async def fetch_task(self, svc: str, worker: str) -> dict[str, Any] | None:
        reply = await self.api(svc, "fetch", {"workerId": worker})
        return reply if reply["result"] is not None else None


@pytest.fixture
def console_keys(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """``a``/``b``: keys of OWNERS[0]/[1]; ``engine``: trusted (may name an owner with X-Owner)."""
    keys: dict[str, str] = {}
    entries = []
    for name, owner, trusted in (("a", OWNERS[0], False), ("b", OWNERS[1], False), ("engine", ENGINE_USER, True)):
        key, entry = new_key(owner, trusted=trusted, key_id=f"console-{name}")
        keys[name] = key
        entries.append(entry)
    path = tmp_path / "gateway-keys.json"
    path.write_text(json.dumps(entries))
    return path, keys


@pytest.fixture
async def start_console(make_bridge: Any, console_keys: tuple[Path, dict[str, str]]) -> AsyncIterator[Any]:
    path, keys = console_keys
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def start(**overrides: Any) -> Client:
        b = await make_bridge(gateway_port=free_port(), gateway_keys_file=path, clock_skew_margin=0.2, **overrides)
        return Client(b.gateway_port, keys, session)

    yield start
    await session.close()


# -- the JSON endpoints -----------------------------------------------------------------------------
async def test_the_page_is_public_and_holds_no_data_every_data_endpoint_needs_a_key(start_console):
    c = await start_console()
    svc = service_id()
    task_id = await c.parked_task(svc)
    page = await c.request("GET", "/console", key=None)
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "<script>" in page.body and svc not in page.body and task_id not in page.body
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "http" not in page.body.replace("http://www.w3.org/2000/svg", ""), "nothing fetched from elsewhere"
    paths = [
        ("GET", "/console/api/session"),
        ("GET", "/console/api/services"),
        ("GET", "/console/api/metrics"),
        ("GET", f"/console/api/queues/{svc}/tasks/{task_id}"),
        ("GET", f"/console/api/queues/{svc}/parked"),
        ("POST", f"/console/api/queues/{svc}/redrive"),
        ("POST", f"/console/api/queues/{svc}/discard"),
        ("GET", "/console/"),
        ("GET", "/console/api/nope"),
    ]
    for method, path in paths:
        for headers in ({}, {"Authorization": "Bearer qb_console-a_wrong"}, {"Authorization": "Basic x"}):
            reply = await c.request(method, path, {"taskIds": [task_id]}, key=None, headers=headers)
            assert reply.status == 401, (method, path, headers, reply.body)
            assert reply.body["error"]["code"] == "unauthorized" and svc not in json.dumps(reply.body)
    session = (await c.console("/session")).result
    assert session == {"keyId": "console-a", "owner": OWNERS[0], "trusted": False, "write": False}


async def test_services_task_history_and_parked_list_read_only_by_default(start_console):
    c = await start_console()
    svc = service_id()
    parked_id = await c.parked_task(svc)
    ready_id = (await c.api(svc, "tasks", {"value": "waiting"}))["task"]["id"]
    row = await c.counted(svc, ready=1, parked=1)
    assert row["inFlight"] == 0 and row["delayed"] == 0 and row["oldestReadyAgeMs"] is not None

    task = (await c.console(f"/queues/{svc}/tasks/{parked_id}")).result["task"]
    assert task["id"] == parked_id and task["serviceId"] == svc
    assert task["state"] == "parked" and task["deliveries"] == 1 and task["maxDeliveries"] == 1
    assert task["worker"] == "w-park" and task["parkReason"] == "failed"
    assert task["addedAt"].endswith("Z") and task["parkedAt"].endswith("Z")
    ready = (await c.console(f"/queues/{svc}/tasks/{ready_id}")).result["task"]
    assert ready["state"] == "ready" and ready["deliveries"] == 0 and ready["worker"] is None

    parked = (await c.console(f"/queues/{svc}/parked?limit=10")).result["tasks"]
    assert [t["id"] for t in parked] == [parked_id]
    assert parked[0]["reason"] == "failed" and parked[0]["deliveries"] == 1
    every_reply = json.dumps([task, ready, parked])
    assert "do-not-show" not in every_reply and "waiting" not in every_reply and "boom" not in every_reply

    # Read-only: redrive and discard are refused, and change nothing.
    for action, body in (
        ("redrive", {"taskIds": [parked_id]}),
        ("redrive", {"all": True}),
        ("discard", {"taskIds": [parked_id]}),
    ):
        refused = await c.console(f"/queues/{svc}/{action}", body)
        assert refused.status == 403, (action, refused.body)
        assert "BRIDGE_CONSOLE_WRITE" in refused.body["error"]["message"]
    assert [t["id"] for t in (await c.console(f"/queues/{svc}/parked")).result["tasks"]] == [parked_id]

    # Not found, bad ids, bad limits.
    missing = await c.console(f"/queues/{svc}/tasks/{uuid.uuid1()}")
    assert missing.status == 404
    for bad in ("not-a-uuid", str(uuid.uuid4())):
        assert (await c.console(f"/queues/{svc}/tasks/{bad}")).status == 400, bad
    for limit in ("0", "abc", "1001", "-1"):
        assert (await c.console(f"/queues/{svc}/parked?limit={limit}")).status == 400, limit


async def test_a_parked_limit_in_digits_other_than_ascii_is_a_bad_request(start_console):
    """The limit was checked with str.isdigit(), true for "²", which int() then refused: a 500."""
    c = await start_console()
    reply = await c.console(f"/queues/{service_id()}/parked?limit=%C2%B2")  # "²"
    assert reply.status == 400 and reply.body["error"]["code"] == "bad_request", (reply.status, reply.body)


async def test_an_owner_sees_only_its_own_and_x_owner_is_for_trusted_keys(start_console):
    c = await start_console()
    svc = service_id()
    parked_id = await c.parked_task(svc)
    await c.counted(svc, parked=1)
    theirs = (await c.console("/services", key="b")).result["services"]
    assert svc not in [s["serviceId"] for s in theirs]
    assert (await c.console(f"/queues/{svc}/tasks/{parked_id}", key="b")).status == 404
    assert (await c.console(f"/queues/{svc}/parked", key="b")).result["tasks"] == []
    named = await c.console("/services", key="b", headers={"X-Owner": OWNERS[0]})
    assert named.status == 403
    trusted = await c.console("/services", key="engine", headers={"X-Owner": OWNERS[0]})
    assert svc in [s["serviceId"] for s in trusted.result["services"]]
    session = (await c.console("/session", key="engine", headers={"X-Owner": OWNERS[0]})).result
    assert session["owner"] == OWNERS[0] and session["trusted"] is True


async def test_with_write_enabled_a_redrive_puts_the_parked_task_back_and_discard_drops_one(start_console):
    c = await start_console(console_write=True)
    assert (await c.console("/session")).result["write"] is True
    svc = service_id()
    first = await c.parked_task(svc)
    second = await c.parked_task(svc)
    assert (await c.console(f"/queues/{svc}/redrive", {"taskIds": [first]})).result == {"redriven": 1}
    back = await wait_for(lambda: c.fetch_task(svc, "w-again"), 10, what="the redriven task handed out")
    assert back["task"]["id"] == first
    assert (await c.console(f"/queues/{svc}/discard", {"taskIds": [second]})).result == {"discarded": 1}
    assert (await c.console(f"/queues/{svc}/parked")).result["tasks"] == []
    redriven = (await c.console(f"/queues/{svc}/redrive", {"all": True})).result
    assert redriven["redriven"] == 0 and "after" not in redriven  # nothing put back, nothing left to scan
    bad = await c.console(f"/queues/{svc}/redrive", {"taskIds": ["nope"]})
    assert bad.status == 400 and bad.body["error"]["code"] == "bad_request"


async def test_the_chart_series_counts_this_bridges_adds_completions_and_redeliveries(start_console):
    c = await start_console()
    before = (await c.console("/metrics")).result
    assert before["intervalSeconds"] == 60 and before["series"] == ["added", "completed", "redelivered"]
    assert 1 <= len(before["points"]) <= 60

    def total(series: dict[str, Any], name: str) -> int:
        return sum(p[name] for p in series["points"])

    svc = service_id()
    for i in range(3):
        await c.api(svc, "tasks", {"value": i})
    got = await c.api(svc, "fetch", {"workerId": "w-chart"})
    await c.api(svc, "ack", {"workerId": "w-chart", "taskId": got["task"]["id"], "result": "ok"})
    after = (await c.console("/metrics")).result
    assert total(after, "added") - total(before, "added") >= 3
    assert total(after, "completed") - total(before, "completed") >= 1
    assert all(p["at"].endswith(":00.000Z") for p in after["points"]), "one point per minute"


# -- the page in a browser --------------------------------------------------------------------------
@pytest.fixture
def chrome(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Headless Chromium through Debian's chromedriver; Selenium Manager is never run."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, f"{missing} missing: run `bash deploy/local/browser.sh` (make test and .ci/run do)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_manager(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Selenium Manager must not run (it would download a driver)")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_manager)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1400",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(UI_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def _sign_in(driver: Any, base: str, key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base + "/console")
    wait = WebDriverWait(driver, UI_TIMEOUT)
    wait.until(ec.visibility_of_element_located((By.ID, "key"))).send_keys(key)
    driver.find_element(By.ID, "sign-in").click()
    wait.until(ec.visibility_of_element_located((By.ID, "app")))


def _service_row(driver: Any, svc: str, **cells: str) -> Any:
    """The service's row once its cells read ``cells`` (class -> text), else False (for WebDriverWait)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        for row in driver.find_elements(By.CSS_SELECTOR, f'#services tr[data-service="{svc}"]'):
            if all(row.find_element(By.CSS_SELECTOR, f"td.{k}").text == v for k, v in cells.items()):
                return row
    except StaleElementReferenceException:  # the page replaced the rows (every 2 s)
        pass
    return False


def _click(driver: Any, css: str) -> None:
    """Click the element once it is there; the page re-renders its tables every 2 s, so an element
    found may be replaced before the click lands: find it again then."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def clicked(d: Any) -> bool:
        found = d.find_elements(By.CSS_SELECTOR, css)
        if not found:
            return False
        found[0].click()
        return True

    WebDriverWait(driver, UI_TIMEOUT, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)).until(
        clicked
    )


def _explained(driver: Any, steps: Callable[..., None], *args: Any) -> None:
    """Run ``steps``; when they fail, save what the page showed (tests/artifacts/) and its console log."""
    try:
        steps(*args)
    except Exception as exc:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / f"console-failed-{steps.__name__}.png"))
        logs = driver.get_log("browser")
        raise AssertionError(
            f"{steps.__name__} failed at {driver.current_url}: {exc!r}\nbrowser log: {logs}\n"
            f"page text: {driver.find_element('tag name', 'body').text[:2000]}"
        ) from exc


def _browse_read_only(driver: Any, base: str, key: str, svc: str, task_id: str) -> None:
    """The read-only console: the service's row with its counts, the parked task without buttons,
    its history by id."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, UI_TIMEOUT, poll_frequency=0.2)
    _sign_in(driver, base, key)
    assert "read-only" in driver.find_element(By.ID, "who").text
    wait.until(lambda d: _service_row(d, svc, service=svc, ready="1", parked="1", **{"in-flight": "0"}))
    _click(driver, f'#services tr[data-service="{svc}"]')
    row = f'#parked tr[data-task="{task_id}"]'
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, row)))
    assert driver.find_elements(By.CSS_SELECTOR, "#parked button.redrive, #parked button.discard") == []
    assert driver.find_element(By.ID, "read-only").is_displayed(), "the page says it is read-only"
    _click(driver, row + " button.link")  # the task's history
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, '#task dd[data-field="state"]'), "parked"))
    assert driver.find_element(By.CSS_SELECTOR, '#task dd[data-field="worker"]').text == "w-park"
    assert driver.find_element(By.CSS_SELECTOR, '#task dd[data-field="deliveries"]').text == "1"
    assert "do-not-show" not in driver.page_source
    # The chart: one line per series, drawn from this bridge's metrics.
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart polyline")) == 3)


def _browse_and_redrive(driver: Any, base: str, key: str, svc: str, task_id: str, shot: Path) -> None:
    """The console with writes: redrive the parked task from its row; screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, UI_TIMEOUT, poll_frequency=0.2)
    _sign_in(driver, base, key)
    assert "write enabled" in driver.find_element(By.ID, "who").text
    wait.until(lambda d: _service_row(d, svc, parked="1"))
    _click(driver, f'#services tr[data-service="{svc}"]')
    button = f'#parked tr[data-task="{task_id}"] button.redrive'
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, button)))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart polyline")) == 3)
    added = '#legend [data-series="added"]'
    wait.until(lambda d: int(d.find_element(By.CSS_SELECTOR, added).text.split()[-1]) >= 2), "the chart counts the adds"
    shot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(shot.with_name(shot.stem + "-parked.png")))
    _click(driver, button)
    wait.until(ec.text_to_be_present_in_element((By.ID, "action-status"), f"Redriven: 1 ({task_id})"))
    wait.until(ec.visibility_of_element_located((By.ID, "no-parked")))
    # Counted in flight until the scheduler re-exposes it (then ready): only "not parked" is certain.
    wait.until(lambda d: _service_row(d, svc, parked="0"))
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(shot)), "screenshot not saved"


async def test_the_console_in_a_browser_shows_a_real_bridge_and_redrives_a_parked_task(start_console, chrome):
    read_only = await start_console()
    writable = await start_console(console_write=True)
    svc = service_id()
    # Added through the writable bridge: its chart (this bridge's own counters) shows them.
    task_id = await writable.parked_task(svc)
    await writable.api(svc, "tasks", {"value": "waiting"})
    key = read_only.keys["a"]

    await asyncio.to_thread(_explained, chrome, _browse_read_only, chrome, read_only.base, key, svc, task_id)
    shot = ARTIFACTS / "console.png"
    shot.unlink(missing_ok=True)
    await asyncio.to_thread(_explained, chrome, _browse_and_redrive, chrome, writable.base, key, svc, task_id, shot)
    assert shot.stat().st_size > 10_000

    # The redrive took effect: the parked task is handed out again (after the waiting one: FIFO).
    ids = set()
    for worker in ("w-after-1", "w-after-2"):
        got = await wait_for(lambda w=worker: writable.fetch_task(svc, w), 10, what="a task handed out")
        ids.add(got["task"]["id"])
    assert task_id in ids


# -- load and hang-ups ------------------------------------------------------------------------------
async def _bridge_and_client(make_bridge: Any, console_keys: tuple[Path, dict[str, str]], **overrides: Any) -> Any:
    path, keys = console_keys
    b = await make_bridge(gateway_port=free_port(), gateway_keys_file=path, clock_skew_margin=0.2, **overrides)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    return b, Client(b.gateway_port, keys, session), session


async def test_a_redrive_whose_tab_closed_mid_way_is_finished(make_bridge, console_keys, monkeypatch):
    """Console writes were not shielded as the gateway's are: a tab closed (or a page reloaded)
    while a redrive ran cancelled it mid-way (counts drifting, an index row left behind), and the
    gateway's stop did not wait for it. Now it runs to its end, and is counted by how it ended."""
    b, c, session = await _bridge_and_client(make_bridge, console_keys, console_write=True)
    try:
        svc = service_id()
        parked_id = await c.parked_task(svc)
        started, release = asyncio.Event(), asyncio.Event()
        real = b.queue.redrive

        async def redrive(owner: str, service: str, task_ids: Any) -> int:
            started.set()
            await release.wait()  # the tab closes here
            return int(await real(owner, service, task_ids))

        monkeypatch.setattr(b.queue, "redrive", redrive)
        body = json.dumps({"taskIds": [parked_id]}).encode()
        writer = await raw_http.send(c.port, raw_http.post(f"/console/api/queues/{svc}/redrive", c.keys["a"], body))
        await asyncio.wait_for(started.wait(), 10)
        server = b.gateway._runner.server
        (serving,) = [h for h in server.connections if getattr(h, "_current_request", None) is not None]
        writer.close()
        await writer.wait_closed()
        await wait_for(lambda: serving._manager is None, 10, what="the gateway seeing the tab gone")
        release.set()
        back = await wait_for(lambda: c.fetch_task(svc, "w-again"), 10, what="the redriven task handed out")
        assert back["task"]["id"] == parked_id
        assert (await c.console(f"/queues/{svc}/parked")).result["tasks"] == []
        ok = b.metrics.registry.get_sample_value("queue_bridge_requests_total", {"method": "redrive", "outcome": "ok"})
        assert ok == 1, "the redrive is counted by how it ended, not as the client's bad request"
    finally:
        await session.close()


async def test_the_console_reads_no_parked_errors_and_reads_service_counts_16_at_a_time(
    make_bridge, console_keys, monkeypatch, cql, servers
):
    """Every 2 s the console asked for up to 100 parked tasks with their errors (read from
    Cassandra and decrypted, then thrown away: it never shows them), and for the counts of up to
    1,000 services all at once (one unbounded gather of their reads)."""
    import bridge.domain.queue as queue_module

    b, c, session = await _bridge_and_client(make_bridge, console_keys)
    try:
        svc = service_id()
        await c.parked_task(svc)
        reads: list[int] = []
        real_errors = b.queue.lifecycle._errors_within_budget

        async def errors(q: Any, task_ids: Any) -> Any:
            reads.append(len(task_ids))
            return await real_errors(q, task_ids)

        monkeypatch.setattr(b.queue.lifecycle, "_errors_within_budget", errors)
        parked = (await c.console(f"/queues/{svc}/parked?limit=100")).result["tasks"]
        assert len(parked) == 1 and "lastError" not in parked[0]
        assert reads == [], "the console's parked list read the tasks' errors"
        # The gateway's parked (the contract's) still lists them.
        listed = (await c.api(svc, "parked"))["result"]["tasks"]
        assert listed[0]["lastError"] == "boom" and reads == [1]

        # Many services of one owner (OWNERS[1]: key "b"); their counts read at most 16 at once.
        owner, prefix = OWNERS[1], f"AAbound-{uuid.uuid4().hex[:6]}-"
        insert = cql.prepare(f"INSERT INTO {servers.keyspace}.services (owner, service) VALUES (?, ?) USING TTL 600")
        for i in range(60):
            cql.execute(insert, (owner, f"{prefix}{i:03d}"))
        running, most = 0, 0
        real_stats = queue_module.service_stats

        async def service_stats(*args: Any, **kwargs: Any) -> Any:
            nonlocal running, most
            running += 1
            most = max(most, running)
            try:
                return await real_stats(*args, **kwargs)
            finally:
                running -= 1

        monkeypatch.setattr(queue_module, "service_stats", service_stats)
        try:
            services = (await c.console("/services", key="b")).result["services"]
            mine = [s["serviceId"] for s in services if s["serviceId"].startswith(prefix)]
            assert mine == sorted(mine) and len(mine) == 60
            assert 1 < most <= 16, f"{most} services' counts read at once"
            # The contract's `stats` of every queue (AMQP and the gateway) reads them as boundedly.
            most = 0
            every = await b.queue.stats(owner, None)
            assert len([s for s in every if s.service.startswith(prefix)]) == 60
            assert 1 < most <= 16, f"the stats RPC read {most} services' counts at once"
        finally:
            cql.execute(
                f"DELETE FROM {servers.keyspace}.services WHERE owner = %s AND service >= %s AND service < %s",
                (owner, prefix, prefix + "~"),
            )
    finally:
        await session.close()


async def test_a_console_tab_in_the_background_stops_polling_and_resumes_when_shown(make_bridge, console_keys, chrome):
    """The page polled /services (every service's counts, read from Cassandra) every 2 s whether
    anybody looked at it or not: a forgotten background tab cost the bridge as much as a watched
    one. It now stops while ``document.hidden`` and polls again as soon as it is shown."""
    b, c, session = await _bridge_and_client(make_bridge, console_keys)
    try:

        def polls() -> float:
            labels = {"method": "stats", "outcome": "ok"}
            return b.metrics.registry.get_sample_value("queue_bridge_requests_total", labels) or 0.0

        await asyncio.to_thread(_sign_in, chrome, c.base, c.keys["a"])
        first = polls()
        await wait_for(lambda: polls() >= first + 1, UI_TIMEOUT, what="the page polling while visible")
        hide = (
            "Object.defineProperty(document, 'hidden', {configurable: true, get: () => arguments[0]});"
            "document.dispatchEvent(new Event('visibilitychange'));"
        )
        await asyncio.to_thread(chrome.execute_script, hide, True)
        settled = polls()  # a poll already under way may still land: one more is allowed below
        window = asyncio.get_running_loop().time() + 3 * 2.0  # three poll intervals (POLL_MS 2 s)
        hidden_polls: list[float] = []
        while asyncio.get_running_loop().time() < window:
            hidden_polls.append(polls())
            await asyncio.sleep(0.2)  # observing a window: the page must ask nothing in it
        assert max(hidden_polls) <= settled + 1, f"{max(hidden_polls) - settled:.0f} polls from a hidden tab"
        quiet = polls()
        await asyncio.to_thread(chrome.execute_script, hide, False)
        await wait_for(lambda: polls() >= quiet + 1, UI_TIMEOUT, what="polling resumed when the tab was shown")
    finally:
        await session.close()


async def test_console_tabs_polling_one_owner_share_one_read_and_a_redrive_is_seen_at_once(
    make_bridge, console_keys, monkeypatch
):
    """Each open tab read every service's counts and the parked indexes every 2 s, nothing shared:
    operators opening the console in an incident multiplied the reads of a strained Cassandra and
    took the owner's slots for long requests (found by review, 2026-12-07). Tabs of one owner now
    share one read at a time, kept a few seconds; a redrive or discard makes the next read fresh."""
    import bridge.console.routes as routes

    b, c, session = await _bridge_and_client(make_bridge, console_keys, console_write=True)
    try:
        svc = service_id()
        task_id = await c.parked_task(svc)
        monkeypatch.setattr(routes, "SHARED_READ_TTL_S", 60.0, raising=False)  # nothing expires in the test
        stats, parked = b.queue.stats, b.queue.lifecycle.parked
        calls = {"stats": 0, "parked": 0}

        async def counted_stats(*args: Any, **kwargs: Any) -> Any:
            calls["stats"] += 1
            return await stats(*args, **kwargs)

        async def counted_parked(*args: Any, **kwargs: Any) -> Any:
            calls["parked"] += 1
            return await parked(*args, **kwargs)

        monkeypatch.setattr(b.queue, "stats", counted_stats)
        monkeypatch.setattr(b.queue.lifecycle, "parked", counted_parked)
        # Ten tabs of owner a poll at once, twice.
        for _ in range(2):
            replies = await asyncio.gather(
                *(c.console(p) for p in ("/services", f"/queues/{svc}/parked?limit=100") for _ in range(10))
            )
            assert all(r.status == 200 for r in replies), [r.body for r in replies if r.status != 200]
        assert calls == {"stats": 1, "parked": 1}, calls
        listed = replies[-1].result["tasks"]
        assert [t["id"] for t in listed] == [task_id]
        # Another owner's tabs read their own.
        assert (await c.console("/services", key="b")).status == 200
        assert calls["stats"] == 2
        # A redrive: the next poll reads again, and shows the task gone from the parked list.
        assert (await c.console(f"/queues/{svc}/redrive", {"taskIds": [task_id]})).result == {"redriven": 1}
        assert (await c.console(f"/queues/{svc}/parked?limit=100")).result["tasks"] == []
        assert calls["parked"] == 2
    finally:
        await session.close()


async def test_a_page_reloaded_while_the_bridge_answers_503_keeps_its_key_and_signs_in_again(
    make_bridge, console_keys, chrome
):
    """Any answer but a 401 to the page's first request signed the operator out and deleted the
    key: a reload during a rolling restart (503, "retry") cost them finding and pasting the key
    again, in an incident (found by review, 2026-12-07). Now only a refused key signs out."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _, c, session = await _bridge_and_client(make_bridge, console_keys)
    try:
        await asyncio.to_thread(_sign_in, chrome, c.base, c.keys["a"])
        # The next page load's first /session is answered 503, as by a bridge shutting down.
        refuse_once = """
            (() => {
              const real = window.fetch;
              let refused = 0;
              window.fetch = function (url, init) {
                if (String(url).endsWith("/console/api/session") && refused++ === 0) {
                  const body = JSON.stringify({error: {code: "unavailable", message: "shutting down; retry"}});
                  const headers = {"Content-Type": "application/json"};
                  return Promise.resolve(new Response(body, {status: 503, headers}));
                }
                return real.apply(this, arguments);
              };
            })();
        """
        await asyncio.to_thread(
            chrome.execute_cdp_cmd, "Page.addScriptToEvaluateOnNewDocument", {"source": refuse_once}
        )

        def reload_and_wait() -> str | None:
            chrome.refresh()
            wait = WebDriverWait(chrome, UI_TIMEOUT)
            # Said where the operator sees it (the sign-in form, the key kept) while it retries...
            wait.until(ec.text_to_be_present_in_element((By.ID, "login-error"), "trying again"))
            assert chrome.find_element(By.ID, "login").is_displayed()
            # ... and the tab hidden and shown meanwhile does not cancel the retry (it did: blank).
            chrome.execute_script("document.dispatchEvent(new Event('visibilitychange'));")
            wait.until(ec.visibility_of_element_located((By.ID, "app")))
            key: str | None = chrome.execute_script("return window.sessionStorage.getItem('qb.console.key');")
            return key

        assert await asyncio.to_thread(reload_and_wait) == c.keys["a"]
    finally:
        await session.close()


async def test_console_paths_check_their_service_id_as_the_gateway_does(start_console):
    """The console's paths took the serviceId as aiohttp matched it: ``%ff`` (not UTF-8) was the
    queue ``%FF``, which the gateway and AMQP refuse; a body naming another serviceId was ignored
    (the gateway answers 400) (found by review, 2026-12-07)."""
    c = await start_console(console_write=True)
    bad = await c.console("/queues/%ff/parked")
    assert bad.status == 400 and "UTF-8" in bad.body["error"]["message"], bad.body
    svc = service_id()
    other = await c.console(f"/queues/{svc}/discard", {"serviceId": svc + "-other", "taskIds": []})
    assert other.status == 400 and "differs" in other.body["error"]["message"], other.body


async def test_a_sign_in_the_bridge_answers_with_a_bad_request_says_why_and_signs_out(start_console, chrome):
    """A refusal that no retry can change (400: an X-Owner that is not UTF-8 once sent) was taken
    for a bridge away: retried every 5 s for ever behind an empty page (found by review,
    2026-12-07). Only a bridge away (network, 5xx, 429) is retried; any other refusal signs out."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    c = await start_console()

    def sign_in_as_a_latin1_owner() -> tuple[str, str | None]:
        chrome.get(c.base + "/console")
        wait = WebDriverWait(chrome, UI_TIMEOUT)
        wait.until(ec.visibility_of_element_located((By.ID, "key"))).send_keys(c.keys["engine"])
        chrome.find_element(By.ID, "owner").send_keys("tenant-\u00e9")
        chrome.find_element(By.ID, "sign-in").click()
        wait.until(lambda d: d.find_element(By.ID, "login-error").text.startswith("the bridge refused"))
        assert chrome.find_element(By.ID, "login").is_displayed()
        key = chrome.execute_script("return window.sessionStorage.getItem('qb.console.key');")
        return chrome.find_element(By.ID, "login-error").text, key

    message, key = await asyncio.to_thread(sign_in_as_a_latin1_owner)
    assert "X-Owner" in message and key is None, (message, key)

    def sign_in_as_an_owner_no_header_can_carry() -> tuple[str, str | None]:
        # Above U+00FF: fetch refuses the header before sending anything, as the network would.
        chrome.find_element(By.ID, "key").send_keys(c.keys["engine"])
        chrome.find_element(By.ID, "owner").clear()
        chrome.find_element(By.ID, "owner").send_keys("tenant-\u0142")
        chrome.find_element(By.ID, "sign-in").click()
        wait = WebDriverWait(chrome, UI_TIMEOUT)
        wait.until(lambda d: "cannot send" in d.find_element(By.ID, "login-error").text)
        key = chrome.execute_script("return window.sessionStorage.getItem('qb.console.key');")
        return chrome.find_element(By.ID, "login-error").text, key

    message, key = await asyncio.to_thread(sign_in_as_an_owner_no_header_can_carry)
    assert "trying again" not in message and key is None, (message, key)


async def test_a_shared_console_read_does_not_outlive_the_gateways_stop(make_bridge, console_keys, monkeypatch):
    """A console read shared by tabs runs on when the request that began it goes: untracked, it went
    on reading (and moving lane cursors) after the gateway's stop, while the store closed (found
    by review, 2026-12-07). The stop now waits for it, up to its deadline, then cancels it."""
    b, c, session = await _bridge_and_client(make_bridge, console_keys)
    try:
        stalled = asyncio.Event()

        async def slow_stats(*args: Any, **kwargs: Any) -> Any:
            stalled.set()
            await asyncio.sleep(3600)  # a read stuck on a strained store

        monkeypatch.setattr(b.queue, "stats", slow_stats)
        polled = asyncio.ensure_future(c.console("/services"))
        await wait_for(stalled.is_set, 10, what="the console's read under way")
        reads = [task for _, task in b.gateway.console.reads._reads.values()]
        assert len(reads) == 1 and not reads[0].done()
        await b.gateway.stop(asyncio.get_running_loop().time() + 0.5)
        assert reads[0].done(), "the shared read ran on past the gateway's stop"
        # Its tab is told to retry elsewhere (503), as for the gateway's own work cut there.
        reply = await polled
        assert reply.status == 503 and "shutting down" in reply.body["error"]["message"], reply.body
    finally:
        await session.close()


async def test_a_late_refusal_of_a_replaced_keys_request_does_not_sign_the_new_key_out(start_console, chrome):
    """A poll of key A still on its way when the operator signed out and in with key B: its late 401
    (A revoked meanwhile) signed B out, and B's sign-in, answered after, left a page "signed in"
    with no key (found by re-review, 2026-12-07). A request's answer counts only for the sign-in it
    was sent for."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    c = await start_console()
    key_a, key_b = c.keys["a"], c.keys["b"]
    # Every request of key A is held 1.5 s and answered 401, as for a key revoked while they ran.
    late_refusals = """
        const keyA = arguments[0];
        const real = window.fetch;
        window.__late = {started: 0, answered: 0};
        window.fetch = function (url, init) {
          const auth = init && init.headers && init.headers.get ? init.headers.get("Authorization") : "";
          if (auth !== "Bearer " + keyA) return real.apply(this, arguments);
          window.__late.started++;
          const body = JSON.stringify({error: {code: "unauthorized", message: "key revoked"}});
          const headers = {"Content-Type": "application/json"};
          return new Promise((resolve) => setTimeout(() => {
            window.__late.answered++;
            resolve(new Response(body, {status: 401, headers}));
          }, 1500));
        };
    """

    def switch_keys_while_a_request_of_a_is_on_its_way() -> str | None:
        _sign_in(chrome, c.base, key_a)
        chrome.execute_script(late_refusals, key_a)
        wait = WebDriverWait(chrome, UI_TIMEOUT)
        wait.until(lambda d: d.execute_script("return window.__late.started > window.__late.answered"))
        pending = chrome.execute_script("return window.__late.started")
        # Sign out and in with B before A's requests are answered.
        chrome.execute_script("window.sessionStorage.removeItem('qb.console.key');")
        chrome.find_element(By.ID, "sign-out").click()
        wait.until(ec.visibility_of_element_located((By.ID, "key"))).send_keys(key_b)
        chrome.find_element(By.ID, "sign-in").click()
        wait.until(lambda d: d.execute_script("return window.__late.answered") >= pending)
        wait.until(ec.visibility_of_element_located((By.ID, "app")))
        assert not chrome.find_element(By.ID, "login").is_displayed()
        key: str | None = chrome.execute_script("return window.sessionStorage.getItem('qb.console.key');")
        return key

    assert await asyncio.to_thread(switch_keys_while_a_request_of_a_is_on_its_way) == key_b
