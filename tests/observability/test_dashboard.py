"""The web dashboard (`cumulus dashboard`) in a real headless Chromium, driven by Debian's
chromedriver over plain WebDriver HTTP: a submitted job appears, its state changes live to
COMPLETED without a reload, its output and event history show; the token is required and a
job's output is shown as text, never as HTML.

`CUMULUS_WRITE_SCREENSHOT=1` also writes the screenshot to docs/img/dashboard.png (the README's).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cumulus import AsyncClient
from services.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")

NO_BROWSER = "needs Debian's chromium and chromium-driver (infra/ci/setup-observability.sh)"


def printer(lines: int, pause: float) -> str:
    """A job that prints `lines` lines, `pause` seconds apart."""
    import time

    for i in range(lines):
        print(f"dashboard line {i}", flush=True)
        time.sleep(pause)
    return "printed"


def shout() -> None:
    print("<script>window.pwned = 1</script>")
    print("<b>bold</b> <img src=x onerror='window.pwned = 2'>")


def sleeper(seconds: float) -> None:
    import time

    time.sleep(seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    """One Chromium session through chromedriver's WebDriver HTTP API (JSON over urllib)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = ""

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())["value"]

    def start(self, profile_dir: Path) -> None:
        args = [
            "--headless=new",
            "--no-sandbox",  # root in CI: Chromium's own sandbox needs a user of its own
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
            f"--user-data-dir={profile_dir}",
        ]
        options = {"binary": CHROMIUM, "args": args}
        caps = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        self.session = self.call("POST", "/session", {"capabilities": caps})["sessionId"]

    def go(self, url: str) -> None:
        self.call("POST", f"/session/{self.session}/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        body = {"script": script, "args": list(args)}
        return self.call("POST", f"/session/{self.session}/execute/sync", body)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("GET", f"/session/{self.session}/screenshot"))

    def stop(self) -> None:
        if self.session:
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.call("DELETE", f"/session/{self.session}")


async def on(browser: Browser, script: str, *args: Any) -> Any:
    """Run `script` in the page (WebDriver calls block: off the event loop)."""
    return await asyncio.to_thread(browser.js, script, *args)


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.2)


ROW = "document.querySelector(`tr[data-job-id='${arguments[0]}']`)"
ROW_STATE = f"const r = {ROW}; return r ? r.dataset.state : null;"
ENDED = "return document.getElementById('job-section').dataset.ended === '1'"
LOG_LINES = "return [...document.querySelectorAll('#logs div')].map(d => d.textContent)"
EVENT_NAMES = "return [...document.querySelectorAll('#history li')].map(li => li.dataset.name)"
TENTHS = (
    "return [...document.querySelectorAll('.device')].reduce((n, d) => n + +d.dataset.tenths, 0)"
)


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
async def dashboard(stack: Stack) -> AsyncIterator[str]:
    """`cumulus dashboard --port 0` for the stack's user `default`; its URL (with the token)."""
    main = "import sys; from cumulus.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        main,
        "--profile",
        stack.profile(),
        "dashboard",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("Cumulus dashboard: http://127.0.0.1:"), line
        yield line.split(": ", 1)[1].strip()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI") == "true":  # CI installs them: missing is a failure there
            pytest.fail(NO_BROWSER)
        pytest.skip(NO_BROWSER)
    port = free_port()
    driver = subprocess.Popen(
        [str(DRIVER), f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its Chromium joins its process group: stopped with it
    )
    browser = Browser(port)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError, urllib.error.URLError):
                if browser.call("GET", "/status").get("ready"):
                    break
            assert time.monotonic() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        browser.start(tmp_path_factory.mktemp("chromium"))
        yield browser
    finally:
        browser.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGTERM)
        try:
            driver.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(10)


async def select(browser: Browser, job_id: str) -> None:
    async def listed() -> bool:
        return await on(browser, ROW_STATE, job_id) is not None

    await until(listed, 30, f"job {job_id} in the list")
    await on(browser, f"{ROW}.click()", job_id)


async def test_a_job_appears_changes_state_live_and_shows_its_output(
    dashboard: str, browser: Browser, client: AsyncClient, tmp_path: Path
) -> None:
    await asyncio.to_thread(browser.go, dashboard)

    async def live() -> bool:
        return bool(await on(browser, "return document.getElementById('live').className === 'on'"))

    await until(live, 20, "the page is live")
    address = await asyncio.to_thread(browser.call, "GET", f"/session/{browser.session}/url")
    assert address == dashboard.split("?")[0]  # the token left the address bar for a cookie
    page = await on(browser, "return window.cumulusPageId")
    job = await client.submit(printer, 4, 0.5, gpu=0.3, duration=600)

    states: list[str] = []

    async def completed() -> bool:
        state = await on(browser, ROW_STATE, job.job_id)
        if state and (not states or states[-1] != state):
            states.append(state)
        return state == "COMPLETED"

    await until(completed, 60, f"job {job.job_id} COMPLETED on the page")
    assert "RUNNING" in states, states  # seen while it ran: the row changed live
    assert await on(browser, "return window.cumulusPageId") == page, "the page was reloaded"

    await select(browser, job.job_id)

    async def shown() -> bool:
        return bool(await on(browser, ENDED))

    await until(shown, 30, "the job's history and output")
    lines = await on(browser, LOG_LINES)
    assert lines == [f"dashboard line {i}" for i in range(4)]
    names = await on(browser, EVENT_NAMES)
    assert names[0] == "submitted"
    for name in ("scheduled", "partition_ready", "started"):
        assert name in names
    assert names[-1] == "completed"

    # A running job holds tenths of a device: the worker's bar shows them. A job asking for
    # both devices then waits, and its row says where and why.
    held = await client.submit(sleeper, 30, gpu=0.5, duration=600)
    waiting = None
    try:

        async def in_use() -> bool:
            tenths = await on(browser, TENTHS)
            return await on(browser, ROW_STATE, held.job_id) == "RUNNING" and tenths >= 5

        await until(in_use, 30, "the running job's 5 tenths on the worker's devices")
        waiting = await client.submit(sleeper, 1, gpu=2, duration=600)

        async def queued() -> bool:
            return await on(browser, ROW_STATE, waiting.job_id) == "QUEUED"

        await until(queued, 30, "the job asking for 2 GPUs QUEUED on the page")
        reason = await on(
            browser, f"return {ROW}.querySelector('.reason').textContent", waiting.job_id
        )
        assert reason.startswith("#1 "), reason
        assert len(reason) > len("#1 "), reason
        png = await asyncio.to_thread(browser.screenshot)
        assert png.startswith(b"\x89PNG")
        (tmp_path / "dashboard.png").write_bytes(png)
        if os.environ.get("CUMULUS_WRITE_SCREENSHOT") == "1":
            (ROOT / "docs" / "img").mkdir(exist_ok=True)
            (ROOT / "docs" / "img" / "dashboard.png").write_bytes(png)
    finally:
        for job in (waiting, held):
            if job is not None:
                await job.cancel()
    assert await on(browser, "return window.cumulusPageId") == page, "the page was reloaded"


async def test_the_token_is_required_and_output_is_text(
    dashboard: str, browser: Browser, client: AsyncClient
) -> None:
    base = dashboard.split("?")[0]
    for path in ("", "api/state", "api/events", "static/app.js", "?token=wrong"):
        assert await asyncio.to_thread(status_of, base + path) == 403, path
    assert await asyncio.to_thread(status_of, dashboard.replace("/?", "/api/state?")) == 200

    job = await client.submit(shout, gpu=0.1, duration=600)
    await job.result(timeout=60)
    await asyncio.to_thread(browser.go, dashboard)
    await select(browser, job.job_id)

    async def shown() -> bool:
        text = await on(browser, "return document.getElementById('logs').textContent")
        return "<script>window.pwned = 1</script>" in text and "<b>bold</b>" in text

    await until(shown, 30, "the job's output, as text")
    assert await on(browser, "return window.pwned === undefined")
    markup = "return document.querySelector('#logs script, #logs b, #logs img')"
    assert await on(browser, markup) is None


def test_cumulus_up_starts_it_on_a_free_port_when_its_own_is_taken(tmp_path: Path) -> None:
    """`cumulus up` prints the dashboard's URL; `dashboard.port` taken: a free port instead."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    env = {
        **os.environ,
        "CUMULUS_HOME": str(tmp_path / "home"),
        "CUMULUS_DASHBOARD_PORT": str(taken.getsockname()[1]),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("CUMULUS_NATS_URL", "CUMULUS_PROFILE"):
        env.pop(name, None)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from cumulus.cli import main; sys.exit(main())"]
            + ["up", "--port", "0", "--data-dir", str(tmp_path / "data")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while "press Ctrl-C" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        url = log.read_text().split("  dashboard: ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:"), url
        assert "/?token=" in url, url
        assert f":{taken.getsockname()[1]}/" not in url
        with urllib.request.urlopen(url.replace("/?", "/api/state?"), timeout=10) as reply:
            state = json.loads(reply.read())
        assert [w["worker_id"] for w in state["workers"]["workers"]] == ["worker-1"]
        assert state["status"] == {"ok": True, "message": "", "user": "default"}
    finally:
        taken.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)  # stopped with the stack
