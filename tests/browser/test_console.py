"""The job console at `/`, end to end in headless Chromium: submit, stream, cancel, the job and batch tables, keys."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from qwen_deploy.config import load_settings
from tests.helpers import Stack

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: chromium chromium-driver)", allow_module_level=True
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 30
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1100",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def listed_jobs(stack: Stack) -> dict[str, str]:
    """Two ended jobs of the table tests' own, submitted through the API: `zen` succeeded (8 tokens), `long`
    canceled (512 tokens asked, canceled at once)."""
    client = stack.client()
    zen = client.submit("Beautiful is better than", max_new_tokens=8)
    long = client.submit("Beautiful is better than", max_new_tokens=512, ignore_eos=True)
    client.cancel(long["id"])
    assert client.wait(zen["id"])["status"] == "succeeded" and client.wait(long["id"])["status"] == "canceled"
    return {"zen": zen["id"], "long": long["id"]}


def text(driver: webdriver.Chrome, element_id: str) -> str:
    """textContent, untrimmed (WebElement.text strips the leading space of " ugly.")."""
    return driver.find_element(By.ID, element_id).get_property("textContent")


def status(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.ID, "status").get_attribute("data-status") or ""


def wait(driver: webdriver.Chrome, predicate: Any, what: str) -> Any:
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: predicate(d), what)


def fill(driver: webdriver.Chrome, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def set_checkbox(driver: webdriver.Chrome, element_id: str, on: bool) -> None:
    box = driver.find_element(By.ID, element_id)
    if box.is_selected() != on:
        box.click()


def open_console(browser: webdriver.Chrome, stack: Stack) -> None:
    if not browser.current_url.startswith(stack.url):
        browser.get(stack.url + "/")


def test_page_shows_model_and_streams_zen(browser: webdriver.Chrome, stack: Stack, tmp_path: Path) -> None:
    browser.get(stack.url + "/")
    model_id = requests.get(stack.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    wait(browser, lambda d: text(d, "model-name") == model_id, "the model id")
    assert "/" not in model_id  # the id, not the demo model's directory
    assert browser.find_element(By.ID, "ready").get_attribute("data-ready") == "yes"

    fill(browser, "prompt", "Beautiful is better than")
    fill(browser, "max-new-tokens", "8")
    set_checkbox(browser, "ignore-eos", False)
    browser.find_element(By.ID, "submit").click()
    wait(browser, lambda d: status(d) == "succeeded", "status succeeded")
    browser.save_screenshot(str(tmp_path / "zen.png"))

    job_id = text(browser, "job-id")
    job = stack.client().get(job_id)
    out = text(browser, "output")
    assert out.startswith(" ugly.") and out == job["output"]["text"]
    progress = browser.find_element(By.ID, "progress")
    assert float(progress.get_property("max")) == 8 and progress.get_property("value") == progress.get_property("max")
    assert text(browser, "progress-text") == "8 / 8 tokens"
    # Everything the page loaded came from the server itself; nothing logged an error.
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(stack.url + "/") for u in urls), urls
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_cancel_a_long_job_keeps_its_partial_text(browser: webdriver.Chrome, stack: Stack, tmp_path: Path) -> None:
    open_console(browser, stack)
    before = text(browser, "job-id")
    fill(browser, "prompt", "Beautiful is better than")
    fill(browser, "max-new-tokens", "512")
    set_checkbox(browser, "ignore-eos", True)
    browser.find_element(By.ID, "submit").click()
    # The demo model writes 512 tokens in about half a second: watch for the first ones in the page.
    job_id = WebDriverWait(browser, WAIT_S, poll_frequency=0.01).until(
        lambda d: d.execute_script(
            "const id = document.getElementById('job-id').textContent;"
            "return id.startsWith('job_') && id !== arguments[0] && document.getElementById('output').textContent"
            " && id",
            before,
        ),
        "streamed output",
    )
    assert status(browser) == "running"  # the text arrived token by token, before the job ended
    browser.find_element(By.ID, "cancel").click()
    wait(browser, lambda d: status(d) == "canceled", "status canceled")
    browser.save_screenshot(str(tmp_path / "canceled.png"))

    job = stack.client().get(job_id)
    out = text(browser, "output")
    assert job["status"] == "canceled" and job["output"]["finish_reason"] == "canceled"
    assert out and out == job["output"]["text"]
    assert 0 < job["progress"]["tokens"] < 512
    assert float(browser.find_element(By.ID, "progress").get_property("value")) == job["progress"]["tokens"]
    assert not browser.find_element(By.ID, "cancel").is_enabled()


def table_row(browser: webdriver.Chrome, job_id: str) -> dict[str, str]:
    """The cells of a job's row in the job table, by class (read in one script: the table is redrawn)."""
    return browser.execute_script(
        "const r = document.querySelector(`#job-list tr[data-id='${arguments[0]}']`);"
        "if (!r) return {};"
        "const cell = (c) => r.querySelector('.' + c)?.textContent ?? '';"
        "return {status: r.dataset.status, type: cell('type'), queue: cell('position'), created: cell('created'),"
        " duration: cell('duration'), rate: cell('rate'), text: r.querySelector('.snippet').title,"
        " error: String(r.querySelector('.snippet').classList.contains('error'))};",
        job_id,
    )


def test_one_job_table_with_type_times_rate_queue_and_error_reason(
    browser: webdriver.Chrome, stack: Stack, listed_jobs: dict[str, str], tmp_path: Path
) -> None:
    open_console(browser, stack)
    client = stack.client()
    late = client.submit("Beautiful is better than", max_new_tokens=512, ignore_eos=True, deadline_seconds=0.01)
    ended = client.wait(late["id"])
    assert ended["error"]["code"] == "deadline_exceeded", ended
    wait(
        browser,
        lambda d: (
            table_row(d, late["id"]).get("status") == ended["status"]
            and table_row(d, listed_jobs["zen"]).get("status") == "succeeded"
        ),
        "the jobs in the table",
    )
    zen, job = table_row(browser, listed_jobs["zen"]), client.get(listed_jobs["zen"])
    assert (zen["type"], zen["queue"], zen["error"]) == ("generation", job["queue"], "false"), zen
    assert zen["text"] == job["output"]["text"].replace("\n", " ↵ ") and zen["created"]
    seconds = job["completed_at"] - job["started_at"]
    assert zen["duration"] == f"{seconds:.2f} s"
    assert float(zen["rate"]) == pytest.approx(job["output"]["usage"]["completion_tokens"] / seconds, abs=0.06)
    failed = table_row(browser, late["id"])
    assert failed["error"] == "true" and failed["text"] == f"deadline_exceeded: {ended['error']['message']}", failed
    # one table of jobs: no second list of the same jobs
    assert browser.find_elements(By.ID, "recent") == [] and len(browser.find_elements(By.CSS_SELECTOR, "tbody")) == 2
    browser.save_screenshot(str(tmp_path / "jobs.png"))


def test_your_jobs_lists_the_api_listing_with_a_status_filter(
    browser: webdriver.Chrome, stack: Stack, listed_jobs: dict[str, str]
) -> None:
    open_console(browser, stack)
    from selenium.webdriver.support.ui import Select

    def listed(d: webdriver.Chrome) -> dict[str, str]:  # read in one script: the table is redrawn every poll
        return dict(
            d.execute_script(
                "return [...document.querySelectorAll('#job-list tr')].map(r => [r.dataset.id, r.dataset.status])"
            )
        )

    wait(browser, lambda d: {listed_jobs["zen"], listed_jobs["long"]} <= set(listed(d)), "both jobs in the job list")
    api_ids = [j["id"] for j in stack.client()._call("GET", "/v1/jobs?limit=20").json()["data"]]
    wait(browser, lambda d: list(listed(d)) == api_ids, "GET /v1/jobs, newest first")
    Select(browser.find_element(By.ID, "jobs-status")).select_by_visible_text("canceled")
    wait(
        browser,
        lambda d: (rows := listed(d)) and listed_jobs["zen"] not in rows and listed_jobs["long"] in rows,
        "the canceled jobs only",
    )
    assert set(listed(browser).values()) == {"canceled"}
    wait(browser, lambda d: "worker" in text(d, "queues"), "the queue overview")
    assert text(browser, "queues").startswith("queued: interactive ") and "1 worker" in text(browser, "queues")
    Select(browser.find_element(By.ID, "jobs-status")).select_by_visible_text("all")


def test_api_errors_are_shown_and_keep_the_previous_output(browser: webdriver.Chrome, stack: Stack) -> None:
    browser.get(stack.url + "/")
    fill(browser, "prompt", "Errors should never")
    fill(browser, "max-new-tokens", "6")
    set_checkbox(browser, "ignore-eos", False)
    browser.find_element(By.ID, "submit").click()
    wait(browser, lambda d: status(d) == "succeeded", "status succeeded")
    before = (text(browser, "job-id"), text(browser, "output"))
    assert before[1].startswith(" pass silently")
    fill(browser, "max-new-tokens", "513")
    browser.find_element(By.ID, "submit").click()
    error = wait(
        browser,
        lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error"),
        "the error box",
    )
    assert error.get_attribute("data-code") == "max_new_tokens_too_large"
    assert "422" in error.text and "max_new_tokens" in error.text
    assert (text(browser, "job-id"), text(browser, "output")) == before and status(browser) == "succeeded"


def test_batch_from_jsonl_shows_its_progress(browser: webdriver.Chrome, stack: Stack) -> None:
    browser.get(stack.url + "/")
    lines = [
        {
            "custom_id": f"zen-{n}",
            "method": "POST",
            "url": "/v1/jobs",
            "body": {"prompt": "Errors should never", "max_new_tokens": 6},
        }
        for n in range(2)
    ]
    fill(browser, "batch-jsonl", "\n".join(json.dumps(line) for line in lines))
    browser.find_element(By.ID, "submit-batch").click()
    row = wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, '#batch-list tr[data-status="completed"]'),
        "a completed batch",
    )[0]
    assert row.find_element(By.CSS_SELECTOR, ".counts").text == "2 ok · 0 failed / 2"
    bar = row.find_element(By.TAG_NAME, "progress")
    assert float(bar.get_property("value")) == float(bar.get_property("max")) == 2
    batch_id = row.get_attribute("data-id")
    assert stack.client().batch(batch_id)["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    row.find_element(By.XPATH, ".//button[text()='results']").click()
    wait(browser, lambda d: text(d, "batch-results").count("pass silently") == 2, "the results")
    # a batch made through the API (not this page) is listed too, newest first
    made = requests.post(
        stack.url + "/v1/batches", json={"requests": [{"custom_id": "api", "body": lines[0]["body"]}]}, timeout=30
    ).json()
    wait(
        browser,
        lambda d: (
            d.execute_script("return [...document.querySelectorAll('#batch-list tr')].map(r => r.dataset.id)")[:2]
            == [made["id"], batch_id]
        ),
        "the API's batch listed first",
    )


@pytest.fixture()
def keyed_url(stack: Stack) -> Iterator[str]:
    """A second web server on the shared stack's Redis and worker, with an API key configured."""
    from web import create_app

    settings = load_settings(environ={**stack.env, "QWEN_DEPLOY_WEB__API_KEYS": '["console-key"]'})
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_api_key_is_sent_as_bearer(browser: webdriver.Chrome, keyed_url: str, tmp_path: Path) -> None:
    browser.get(keyed_url + "/")  # the page and its assets are open; the API is not
    wait(browser, lambda d: d.find_element(By.ID, "ready").get_attribute("data-ready") == "no", "a 401")
    assert "invalid_api_key" in text(browser, "ready")
    fill(browser, "api-key", "console-key")
    browser.find_element(By.ID, "prompt").click()  # blur: the key is saved on change
    wait(browser, lambda d: d.find_element(By.ID, "ready").get_attribute("data-ready") == "yes", "the model")
    assert browser.execute_script("return sessionStorage.getItem('qd.apiKey')") == '"console-key"'

    fill(browser, "prompt", "Errors should never")
    fill(browser, "max-new-tokens", "6")
    set_checkbox(browser, "ignore-eos", False)
    browser.find_element(By.ID, "submit").click()
    wait(browser, lambda d: status(d) == "succeeded", "status succeeded")
    assert text(browser, "output").startswith(" pass silently")
    browser.save_screenshot(str(tmp_path / "keyed.png"))


def test_activity_charts_draw_what_the_jobs_did(browser: webdriver.Chrome, stack: Stack, tmp_path: Path) -> None:
    """After jobs ran, the tokens/s and jobs/min charts hold points and the screenshot shows their lines
    (a chart left empty fails this)."""
    from qwen_deploy.stats_history import default_queues, record_if_due

    store = stack.app().extensions["qwen_deploy"].store
    store.client.delete(store.stats_history_lock_key())
    record_if_due(store, 60, default_queues(store))  # a sample before the jobs (the heartbeat takes them too)
    client = stack.client()
    for round_ in range(2):  # two intervals with jobs in each: a line of two points at least
        for i in range(3):
            job = client.submit("Beautiful is better than", max_new_tokens=16, seed=round_ * 3 + i)
            assert client.wait(job["id"])["status"] == "succeeded"
        store.client.delete(store.stats_history_lock_key())
        record_if_due(store, 60, default_queues(store))
    browser.get(stack.url + "/")

    def drawn(d: webdriver.Chrome) -> bool:
        return all(
            int(d.find_element(By.ID, c).get_attribute("data-points") or 0) > 0 for c in ("chart-tokens", "chart-jobs")
        )

    wait(browser, drawn, "the charts' points")
    tokens = browser.find_element(By.ID, "chart-tokens")
    legend = tokens.find_element(By.CSS_SELECTOR, ".legend").get_property("textContent")
    assert float(legend.split()[-1]) > 0, legend  # the last point's tokens/s
    path = tmp_path / "charts.png"
    browser.execute_script("document.getElementById('activity').scrollIntoView()")
    tokens.find_element(By.TAG_NAME, "svg").screenshot(str(path))
    accent = (0x2F, 0x6F, 0xDE)  # the line colour (--accent)
    near = sum(1 for px in png_pixels(path.read_bytes()) if all(abs(a - b) < 40 for a, b in zip(px, accent)))
    assert near > 20, f"no line drawn in {path}"


def png_pixels(data: bytes) -> list[tuple[int, ...]]:
    """The RGB(A) pixels of an 8-bit, non-interlaced PNG (what Chromium's screenshots are)."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, _, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            chunks += body
        pos += 12 + length
    raw, stride, prev, out = zlib.decompress(chunks), width * channels, bytearray(width * channels), []
    for row in range(len(raw) // (stride + 1)):
        kind, line = raw[row * (stride + 1)], bytearray(raw[row * (stride + 1) + 1 : (row + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        out.extend(tuple(line[i : i + 3]) for i in range(0, stride, channels))
        prev = line
    return out
