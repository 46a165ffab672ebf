"""The influence dashboard end to end: Debian `chromium` (headless, driven by Selenium through
`/usr/bin/chromedriver`) against a real `tracin serve` on 127.0.0.1 started with an API key.

Set-up (Debian / Ubuntu):  apt-get install -y chromium chromium-driver;  pip install selenium
The tests skip, saying why, when chromium, chromedriver or selenium is missing.

    TRACIN_DASHBOARD_INDEX=DIR   serve this index directory instead of a briefly trained digits index
                                 (e.g. the full demo: tracin demo --out /tmp/demo --no-serve)
    TRACIN_SCREENSHOTS=docs      also save full-page screenshots of each view as docs/dashboard-*.png, and
                                 the sha256 of the dashboard's files they show in
                                 docs/dashboard-screenshots.sha256 (tests.test_docs.py then
                                 fails when the dashboard changes and the pictures were not taken again)
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.service_support import REPO, digits_index, start_server, train_checkpoints

CHROMIUM = os.environ.get("TRACIN_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TRACIN_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1440,1000", "--lang=en-US"]
# No network but 127.0.0.1: names do not resolve, and anything else goes to a proxy that is not there.
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9"]
WAIT = 30.0


def _missing() -> str | None:
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        return f"{CHROMIUM} not found (apt-get install -y chromium chromium-driver)"
    if not Path(CHROMEDRIVER).is_file():
        return f"{CHROMEDRIVER} not found (apt-get install -y chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api_key() -> str:
    return "dash-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def server(api_key):
    index = os.environ.get("TRACIN_DASHBOARD_INDEX")
    index_dir = Path(index) if index else digits_index()
    proc = start_server(index_dir, env={"TRACIN_API_KEY": api_key, "TRACIN_TORCH_THREADS": "1"})
    try:
        yield proc.base_url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def api(server, api_key):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    profile = tempfile.mkdtemp(prefix="tracin-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + OFFLINE + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# -- helpers -------------------------------------------------------------------------------------

def wait_for(predicate, timeout: float = WAIT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - stale elements while the page re-renders
            last_exc = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def one(driver, selector):
    return wait_for(lambda: (css(driver, selector) or [None])[0], what=selector)


def banner(driver) -> dict | None:
    el = css(driver, "#error-banner")[0]
    if not el.is_displayed():
        return None
    return {"status": el.get_attribute("data-status"), "code": el.get_attribute("data-code"), "text": el.text}


def rendered_hits(driver, kind: str) -> list[tuple[str, float]]:
    return [(li.get_attribute("data-id"), float(li.get_attribute("data-score")))
            for li in css(driver, f"#{kind} li.hit")]


def results_for(driver, source: str, query_id: str):
    def ready():
        body = css(driver, "#results-body")[0]
        if body.get_attribute("data-source") == source and body.get_attribute("data-query-id") == query_id \
                and css(driver, "#proponents li.hit") and not css(driver, "#results[aria-busy=true]"):
            return json.loads(body.get_attribute("data-request"))
        return None

    return wait_for(ready, what=f"results for {source} {query_id}")


def assert_hits_equal(driver, answer: dict) -> None:
    for kind in ("proponents", "opponents"):
        shown = rendered_hits(driver, kind)
        expected = [(h["id"], h["score"]) for h in answer[kind]]
        assert [i for i, _ in shown] == [i for i, _ in expected], kind
        for (_, got), (_, want) in zip(shown, expected):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-9), kind


def _screenshot_dir() -> Path | None:
    """$TRACIN_SCREENSHOTS (relative to the repository), created, with the digest of the dashboard's files
    written beside the pictures (tests.test_docs.py); None when it is not set."""
    from tests.test_docs import DIGEST_FILE, static_digest

    target = os.environ.get("TRACIN_SCREENSHOTS")
    if not target:
        return None
    out = Path(target) if Path(target).is_absolute() else REPO / target
    out.mkdir(parents=True, exist_ok=True)
    (out / DIGEST_FILE).write_text(static_digest())
    return out


def screenshot(driver, name: str) -> None:
    """Full-page PNG under $TRACIN_SCREENSHOTS (relative to the repository) when it is set."""
    out = _screenshot_dir()
    if out is None:
        return
    height, chrome = driver.execute_script(
        "return [Math.max(document.documentElement.scrollHeight, document.body.scrollHeight),"
        " window.outerHeight - window.innerHeight]")
    driver.set_window_size(1440, min(max(int(height), 900), 1500) + int(chrome))
    time.sleep(0.4)  # layout after resize (histogram redraw is debounced)
    driver.save_screenshot(str(out / f"dashboard-{name}.png"))
    driver.set_window_size(1440, 1000)


def self_rows(driver) -> list[dict]:
    def parsed(tr, name):
        text = tr.get_attribute(name)
        return json.loads(text) if text else None

    return [{"id": tr.get_attribute("data-id"), "score": float(tr.get_attribute("data-score")),
             "label": parsed(tr, "data-label"), "flipped": "flipped" in (tr.get_attribute("class") or ""),
             "prediction": parsed(tr, "data-prediction"), "probability": parsed(tr, "data-probability"),
             "suggested": parsed(tr, "data-suggested")}
            for tr in css(driver, "#si-table tbody tr[data-id]")]


# -- tests (in order: they share one browser session) ----------------------------------------------

def test_static_assets_are_public_and_api_is_not(server, api):
    anon = httpx.get(server + "/", headers={"Accept": "text/html"})
    assert anon.status_code == 200 and "<title>tracin-service" in anon.text
    csp = anon.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    for asset in ("app.js", "api.js", "widgets.js", "style.css"):
        r = httpx.get(f"{server}/dashboard/{asset}")
        assert r.status_code == 200 and len(r.content) > 500, asset
        text = r.text.replace("http://www.w3.org/2000/svg", "")  # the SVG namespace name, not a resource
        assert "http://" not in text and "https://" not in text, f"{asset} names an external URL"
    assert "http" not in anon.text.replace('rel="noopener"', "")  # no external resource in the page
    # The dashboard does not shadow the API: `/` for API clients, and the data routes, still need the key.
    assert httpx.get(server + "/").status_code == 401
    assert httpx.get(server + "/index", headers={"Accept": "text/html"}).status_code == 401
    assert api.get("/").json()["service"] == "tracin-service"
    assert httpx.get(server + "/dashboard/", follow_redirects=False).headers["location"] == "/"


def test_page_asks_for_the_key_then_loads(browser, server, api_key):
    browser.get(server + "/")
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready === 'true'"), what="page ready")
    shown = wait_for(lambda: banner(browser), what="401 banner")
    assert shown["status"] == "401" and "authorization" in shown["text"] and "API key" in shown["text"]
    assert "attention" in css(browser, "#key-form")[0].get_attribute("class")
    key = css(browser, "#api-key")[0]
    key.clear()
    key.send_keys(api_key)
    css(browser, "#key-save")[0].click()
    wait_for(lambda: css(browser, "#query-list .query-item"), what="held-out examples")
    assert banner(browser) is None
    assert browser.execute_script("return localStorage.getItem('tracin.apiKey')") == api_key
    assert "examples" in css(browser, "#index-chip")[0].text
    # Nothing but this origin (and data: URLs) was requested.
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(server) or u.startswith("data:") for u in urls), urls


def test_explain_held_out_example_matches_api(browser, api):
    queries = api.get("/queries", params={"limit": 3}).json()["items"]
    first = css(browser, "#query-list .query-item")[0]
    assert first.get_attribute("data-id") == queries[0]["id"]
    first.click()
    sent = results_for(browser, "held-out", queries[0]["id"])
    assert sent == {"example": queries[0]["example"], "k": 10}
    answer = api.post("/influence", json=sent).json()
    assert_hits_equal(browser, answer)
    assert len(rendered_hits(browser, "proponents")) == 10
    summary = css(browser, "#query-summary")[0].text
    assert answer["label_used_name"] in summary and queries[0]["id"] in summary
    assert len(css(browser, "#query-summary .prob")) == min(10, len(answer["prediction"]["probabilities"]))
    # Flipped training examples are marked exactly where the API's display fields say so.
    for kind in ("proponents", "opponents"):
        for li, hit in zip(css(browser, f"#{kind} li.hit"), answer[kind]):
            assert ("flipped" in li.get_attribute("class")) == bool(hit["display"].get("flipped")), hit["id"]
    screenshot(browser, "explain")


def test_click_a_hit_explains_that_training_example(browser, api):
    hit = css(browser, "#proponents li.hit")[1]
    train_id = hit.get_attribute("data-id")
    hit.click()
    sent = results_for(browser, "train", train_id)
    assert sent == {"train_id": train_id, "k": 10, "exclude_self": True}
    assert_hits_equal(browser, api.post("/influence", json=sent).json())
    info = api.get(f"/examples/{train_id}").json()
    summary = css(browser, "#query-summary")[0].text
    assert train_id in summary and f"rank {info['rank']}" in summary
    assert "#/explain/train/" in browser.current_url
    crumbs = [c.text for c in css(browser, "#trail .crumb")]
    assert crumbs[-1] == train_id and len(crumbs) == 2
    browser.back()  # the browser's history walks back to the held-out example
    results_for(browser, "held-out", crumbs[0])


def test_self_influence_view_first_rows(browser, api):
    """The label-review view opens on the server's default ranking, with the prediction, its probability
    and the suggested label of every row as GET /label-review gives them."""
    css(browser, "#tab-self")[0].click()
    wait_for(lambda: len(css(browser, "#si-table tbody tr[data-id]")) == 50, what="50 label-review rows")
    top = api.get("/label-review", params={"k": 50}).json()
    assert top["ranking"] == top["default_ranking"] == "combined"
    rows = self_rows(browser)
    assert [r["id"] for r in rows] == [x["id"] for x in top["items"]]
    assert [r["score"] for r in rows] == pytest.approx([x["score"] for x in top["items"]], rel=1e-9)
    assert [r["flipped"] for r in rows] == [bool(x["display"].get("flipped")) for x in top["items"]]
    assert [r["prediction"] for r in rows] == [x["prediction"] for x in top["items"]]
    assert [r["probability"] for r in rows] == pytest.approx([x["probability"] for x in top["items"]], rel=1e-12)
    assert [r["suggested"] for r in rows] == [x["suggested_label"] for x in top["items"]]
    assert any(r["suggested"] is not None for r in rows) and css(browser, "#si-table .suggest")
    assert css(browser, "#si-ranking")[0].get_attribute("value") == "combined"
    assert "percentile ranks" in css(browser, "#si-ranking-note")[0].text
    assert any(r["flipped"] for r in rows), "the digits demo's flipped labels should reach the top 50"
    assert f"of {top['total']:,}" in css(browser, "#si-pager")[0].text
    assert css(browser, "#si-flipped")[0].text.startswith("flipped on this page:")
    # Histogram: one bar group per bin, counting every training example (client-side or from a route).
    wait_for(lambda: css(browser, "#si-histogram svg .bin"), what="histogram")
    counted = browser.execute_script(
        "return [...document.querySelectorAll('#si-histogram .bin .bar:not(.flag)')]"
        ".reduce((n, r) => n + (r.getAttribute('height') > 0 ? 1 : 0), 0)")
    assert counted > 5
    assert css(browser, "#si-histogram")[0].get_attribute("data-source") == "server"  # GET /label-review/histogram
    note = css(browser, "#hist-note")[0].text
    assert f"{top['total']:,} examples" in note
    screenshot(browser, "label-review")


def test_self_influence_label_filter_and_paging(browser, api):
    from selenium.webdriver.support.ui import Select

    Select(css(browser, "#si-label")[0]).select_by_value("3")
    wait_for(lambda: "label=3" in browser.current_url and self_rows(browser)
             and all(r["label"] == 3 for r in self_rows(browser)), what="label 3 rows")
    page = api.get("/label-review", params={"k": 50, "label": 3}).json()
    wait_for(lambda: [r["id"] for r in self_rows(browser)] == [x["id"] for x in page["items"]], what="label 3 page")
    css(browser, "#si-pager button[data-go=next]")[0].click()
    page2 = api.get("/label-review", params={"k": 50, "offset": 50, "label": 3}).json()
    wait_for(lambda: [r["id"] for r in self_rows(browser)] == [x["id"] for x in page2["items"]], what="label 3 page 2")
    ranks = [int(td.text.replace(",", "")) for td in css(browser, "#si-table tbody tr td:first-child")]
    assert ranks == [x["rank"] for x in page2["items"]]
    # Clicking a row explains that training example.
    row = css(browser, "#si-table tbody tr[data-id]")[0]
    train_id = row.get_attribute("data-id")
    row.click()
    results_for(browser, "train", train_id)


def test_switch_ranking_and_export_the_ranked_list(browser, server, api, tmp_path):
    """The ranking select reorders the list (the same rows as GET /label-review?ranking=..., and as
    GET /self-influence/top for self_influence); the CSV and JSON exports download the chosen ranking's
    whole list with its scores, as GET /label-review/export gives it."""
    import csv
    import io

    from selenium.webdriver.support.ui import Select

    browser.get(server + "/#/self")
    wait_for(lambda: len(self_rows(browser)) == 50, what="label-review rows")
    Select(css(browser, "#si-ranking")[0]).select_by_value("self_influence")
    top = api.get("/self-influence/top", params={"k": 50}).json()
    wait_for(lambda: "ranking=self_influence" in browser.current_url
             and [r["id"] for r in self_rows(browser)] == [x["id"] for x in top["items"]], what="self-influence order")
    assert [r["score"] for r in self_rows(browser)] == pytest.approx([x["score"] for x in top["items"]], rel=1e-9)
    Select(css(browser, "#si-ranking")[0]).select_by_value("margin")
    page = api.get("/label-review", params={"k": 50, "ranking": "margin"}).json()
    assert page["order"] == "ascending" and [x["score"] for x in page["items"]] == sorted(x["score"] for x in page["items"])
    wait_for(lambda: "ranking=margin" in browser.current_url
             and [r["id"] for r in self_rows(browser)] == [x["id"] for x in page["items"]], what="margin order")
    wait_for(lambda: css(browser, "#si-histogram")[0].get_attribute("data-ranking") == "margin", what="margin histogram")
    assert css(browser, "#si-score-head")[0].text == "margin" and "lowest first" in css(browser, "#si-ranking-note")[0].text
    # Exports of the chosen ranking (downloaded by the browser with the API key)
    browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    css(browser, "#si-export-csv")[0].click()
    path = wait_for(lambda: (tmp_path / "label-review-margin.csv").is_file() and tmp_path / "label-review-margin.csv",
                    what="CSV download")
    text = wait_for(lambda: path.read_text() if path.read_text().count("\n") > page["total"] else None, what="whole CSV")
    rows = list(csv.DictReader(io.StringIO(text)))
    expected = api.get("/label-review/export", params={"format": "csv", "ranking": "margin"}).text
    assert text == expected and len(rows) == page["total"]
    for row, item in zip(rows, page["items"]):
        assert row["id"] == item["id"] and row["ranking"] == "margin" and int(row["rank"]) == item["rank"]
        assert float(row["score"]) == pytest.approx(item["score"], rel=1e-12)
        assert int(row["label"]) == item["label"] and int(row["prediction"]) == item["prediction"]
        assert float(row["probability"]) == pytest.approx(item["probability"], rel=1e-12)
        assert row["suggested_label"] == ("" if item["suggested_label"] is None else str(item["suggested_label"]))
        assert row["display.flipped"] == ("true" if item["display"]["flipped"] else "false")
    assert "display.image" not in rows[0]  # pictures stay out of exports
    css(browser, "#si-export-json")[0].click()
    json_path = tmp_path / "label-review-margin.json"
    data = wait_for(lambda: json_path.is_file() and _json_or_none(json_path), what="JSON download")
    assert data["ranking"] == "margin" and data["order"] == "ascending" and data["total"] == page["total"]
    assert [x["id"] for x in data["items"][:50]] == [x["id"] for x in page["items"]]
    assert [x["score"] for x in data["items"][:50]] == [x["score"] for x in page["items"]]
    assert banner(browser) is None
    screenshot(browser, "label-review-margin")


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_index_panel(browser, api):
    css(browser, "#tab-index")[0].click()
    panel = wait_for(lambda: css(browser, "#index-panel .card") and css(browser, "#index-panel")[0], what="index panel")
    info = api.get("/index").json()
    text = panel.text
    assert info["task"]["ref"] in text and info["projection"]["kind"] in text
    assert f"{info['count']:,}" in text and f"{info['embedding_dim']:,}" in text
    assert ("approximate" if info["approximate"] else "exact") in text
    lrs = [float(td.text) for td in css(browser, "#index-panel table.plain td.num")]
    assert lrs == pytest.approx([c["lr"] for c in info["checkpoints"]], rel=1e-3)
    _assert_optimizer_shown(browser, info)
    screenshot(browser, "index")


def _assert_optimizer_shown(browser, info: dict) -> None:
    """The Index view says which formula the index uses and why (issue 18), per checkpoint too."""
    assert one(browser, "#optimizer-formula").text == info["optimizer"]["formula"]
    assert one(browser, "#optimizer-why").text == info["optimizer"]["why"]
    formulas = [td.text for td in css(browser, "#checkpoints-table td.formula")]
    assert formulas == [c["formula"] for c in info["checkpoints"]]
    groups = [td.text for td in css(browser, "#checkpoints-table td.group-lrs")]
    assert [len(g.split(" · ")) for g in groups] == [max(1, len(c["groups"])) for c in info["checkpoints"]]


def test_input_follows_the_task_example_schema(browser):
    """The Explain input is chosen from the example's JSON schema (as GET /index / OpenAPI document it)."""
    from indexer.demo.digits import DigitsExample
    from indexer.demo.fashion_mnist import FashionMNISTExample
    from indexer.tasks.vision import ImageExample
    from tests.dashboard_tasks import TextExample

    schemas = [DigitsExample.model_json_schema(), FashionMNISTExample.model_json_schema(),
               TextExample.model_json_schema(), {"properties": {"x": {"type": "array", "items": {"type": "number"}}}},
               ImageExample.model_json_schema()]
    specs = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('./dashboard/widgets.js').then(m => done(arguments[0].map(m.inputSpec)), e => done(String(e)));",
        schemas)
    assert specs[0] == {"kind": "image", "field": "pixels", "side": 8, "layout": "flat", "min": 0, "max": 16,
                        "integer": True}
    assert specs[1] == {"kind": "image", "field": "image", "side": 28, "layout": "nested", "min": 0, "max": 255,
                        "integer": True}
    assert specs[2] == {"kind": "text", "field": "text"}
    assert specs[3] == {"kind": "json"}
    assert specs[4] == {"kind": "image-file", "field": "image"}  # a base64 file: an upload, not a textarea


def test_upload_an_image(browser, api, tmp_path):
    """A dark-on-white PNG 4x the model's size: downscaled in a canvas, inverted, scaled to 0..16, explained."""
    import numpy as np

    from indexer.images import png_bytes

    pixels = np.asarray(api.get("/queries", params={"limit": 1}).json()["items"][0]["example"]["pixels"])
    gray = (255 - np.round(pixels.reshape(8, 8) * 255 / 16)).astype(np.uint8)  # ink dark, paper white
    path = tmp_path / "my-digit.png"
    path.write_bytes(png_bytes(gray, scale=4))
    css(browser, "#tab-explain")[0].click()
    wait_for(lambda: css(browser, "#view-explain")[0].is_displayed(), what="explain view")
    css(browser, "#upload")[0].send_keys(str(path))
    sent = results_for(browser, "upload", "my-digit.png")
    got = np.asarray(sent["example"]["pixels"], dtype=float)
    assert got.shape == (64,) and got.min() >= 0 and got.max() == 16 and np.all(got == np.round(got))
    assert np.corrcoef(got, pixels)[0, 1] > 0.95
    assert_hits_equal(browser, api.post("/influence", json=sent).json())
    assert "inverted" in css(browser, "#upload-note")[0].text and banner(browser) is None


def _histogram_counts(driver) -> list[int]:
    import re

    titles = driver.execute_script(
        "return [...document.querySelectorAll('#si-histogram .bin title')].map(t => t.textContent)")
    return [int(re.search(r": ([\d,]+) examples", t).group(1).replace(",", "")) for t in titles]


def test_log_x_checkbox_switches_the_histogram_scale(browser, server, api):
    browser.get(server + "/#/self")
    hist = lambda: css(browser, "#si-histogram")[0]  # noqa: E731
    wait_for(lambda: hist().get_attribute("data-scale") == "log" and css(browser, "#si-histogram .bin"),
             what="log histogram")
    log_counts = api.get("/label-review/histogram", params={"bins": 40, "scale": "log"}).json()["counts"]
    linear_counts = api.get("/label-review/histogram", params={"bins": 40, "scale": "linear"}).json()["counts"]
    assert log_counts != linear_counts
    assert _histogram_counts(browser) == log_counts and "log scale" in hist().text
    checkbox = css(browser, "#hist-log")[0]
    checkbox.click()  # off: linear bins and axis
    wait_for(lambda: hist().get_attribute("data-scale") == "linear", what="linear histogram")
    wait_for(lambda: _histogram_counts(browser) == linear_counts, what="linear bins drawn")
    assert "log scale" not in hist().text and banner(browser) is None
    checkbox.click()  # on again
    wait_for(lambda: hist().get_attribute("data-scale") == "log" and _histogram_counts(browser) == log_counts,
             what="log histogram again")


def test_stale_results_are_cleared(browser, server, api):
    """An answer leaves the screen when the query options change or a later request fails."""
    browser.get(server + "/#/explain/query/0")
    first = api.get("/queries", params={"limit": 1}).json()["items"][0]["id"]
    results_for(browser, "held-out", first)
    cleared = lambda: (css(browser, "#results-cleared") and not css(browser, "#results-body li.hit")  # noqa: E731
                       and css(browser, "#results-body")[0].get_attribute("data-source") == "")
    k = css(browser, "#opt-k")[0]
    k.clear()
    k.send_keys("5")
    css(browser, "#options summary")[0].click()  # the input loses focus: a change event
    css(browser, "#options summary")[0].click()
    wait_for(cleared, what="results cleared after k changed")
    assert "options changed" in css(browser, "#results-cleared")[0].text
    css(browser, "#rerun")[0].click()  # the same query again, with the new options
    sent = results_for(browser, "held-out", first)
    assert sent["k"] == 5 and len(rendered_hits(browser, "proponents")) == 5
    from selenium.webdriver.support.ui import Select

    Select(css(browser, "#opt-filter")[0]).select_by_value("3")
    wait_for(cleared, what="results cleared after the label filter changed")
    Select(css(browser, "#opt-filter")[0]).select_by_value("")
    css(browser, "#rerun")[0].click()
    results_for(browser, "held-out", first)
    # A failing request: the error banner, and no answer left under it.
    if not css(browser, "#raw-json")[0].get_attribute("open"):
        css(browser, "#raw-json summary")[0].click()
    raw = css(browser, "#raw-example")[0]
    raw.clear()
    raw.send_keys('{"pixels": [1, 2, 3]}')
    css(browser, "#raw-run")[0].click()
    wait_for(lambda: banner(browser), what="422 banner")
    wait_for(cleared, what="results cleared under the error")
    k = css(browser, "#opt-k")[0]
    k.clear()
    k.send_keys("10")
    css(browser, "#error-close")[0].click()


def _crumbs(driver) -> list[tuple[str, bool]]:
    return [(c.text, c.get_attribute("data-failed") == "true") for c in css(driver, "#trail .crumb")]


def test_a_failed_request_moves_the_trail_and_again_to_the_failed_query(browser, server, api):
    """After a failed request the trail ends with the query that failed (marked failed), and "again"
    repeats that query, not the previous answer's (issue 22, item 7)."""
    browser.get(server + "/#/index")
    browser.get(server + "/#/explain/query/0")
    first = api.get("/queries", params={"limit": 1}).json()["items"][0]["id"]
    results_for(browser, "held-out", first)
    hit = css(browser, "#proponents li.hit")[0]
    train_id = hit.get_attribute("data-id")
    hit.click()
    results_for(browser, "train", train_id)
    assert [c for c, _ in _crumbs(browser)][-2:] == [first, train_id]
    # 1. A request that fails before POST /influence (an unknown training example: GET /examples/... is 404).
    browser.get(server + "/#/explain/train/no-such-example")
    shown = wait_for(lambda: banner(browser), what="404 banner")
    assert shown["status"] == "404"
    wait_for(lambda: css(browser, "#results-cleared"), what="results cleared")
    assert _crumbs(browser)[-1] == ("no-such-example", True) and (train_id, False) in _crumbs(browser)
    again = css(browser, "#rerun")[0]
    assert again.text == "Explain no-such-example again"
    assert "no-such-example" in css(browser, "#results-cleared")[0].text
    again.click()  # repeats the failed query: the same 404, not the previous answer
    wait_for(lambda: (b := banner(browser)) and b["status"] == "404", what="404 banner again")
    assert not css(browser, "#results-body li.hit") and _crumbs(browser)[-1] == ("no-such-example", True)
    # 2. POST /influence itself refuses (422): "again" names that query.
    css(browser, "#error-close")[0].click()
    browser.get(server + "/#/explain")
    if not css(browser, "#raw-json")[0].get_attribute("open"):
        css(browser, "#raw-json summary")[0].click()
    raw = css(browser, "#raw-example")[0]
    raw.clear()
    raw.send_keys('{"pixels": [1, 2, 3]}')
    css(browser, "#raw-run")[0].click()
    wait_for(lambda: (b := banner(browser)) and b["status"] == "422", what="422 banner")
    wait_for(lambda: css(browser, "#rerun") and css(browser, "#rerun")[0].text == "Explain edited JSON again",
             what="again names the edited JSON")
    assert _crumbs(browser)[-1] == ("edited JSON", True)
    # 3. The next answer: the failed crumb is gone, the answered query is current.
    css(browser, "#error-close")[0].click()
    browser.get(server + "/#/explain/query/0")
    results_for(browser, "held-out", first)
    crumbs = _crumbs(browser)  # the trail walks back to `first` (alone: no trail shown)
    assert all(not failed for _, failed in crumbs) and (not crumbs or crumbs[-1][0] == first), crumbs
    assert not css(browser, "#rerun")


def test_the_high_self_influence_hint_offers_the_normalised_view(browser, server, api):
    """A raw answer whose hits are mostly high-self-influence examples shows the API's hint, and its button
    asks for the same query normalised (issue 22, item 8)."""
    from selenium.webdriver.support.ui import Select

    browser.get(server + "/#/index")
    browser.get(server + "/#/explain/query/0")
    first = api.get("/queries", params={"limit": 1}).json()["items"][0]
    sent = results_for(browser, "held-out", first["id"])
    answer = api.post("/influence", json=sent).json()
    assert "normalize" not in sent and answer["hints"], "the test index should give query 0 the hint"
    note = one(browser, "#hint-note")
    hint = answer["hints"][0]
    assert note.get_attribute("data-code") == "high_self_influence" and note.get_attribute("title") == hint["message"]
    assert f"{hint['in_top']} of the {hint['hits']} hits (both ends) are in the top 10%" in note.text
    css(browser, "#hint-normalize")[0].click()
    normalised = wait_for(lambda: (body := css(browser, "#results-body")[0]).get_attribute("data-request")
                          and json.loads(body.get_attribute("data-request")).get("normalize") == "train"
                          and css(browser, "#proponents li.hit") and not css(browser, "#results[aria-busy=true]")
                          and json.loads(body.get_attribute("data-request")), what="the normalised answer")
    again = api.post("/influence", json=normalised).json()
    assert_hits_equal(browser, again)
    assert again["hints"] == [] and not css(browser, "#hint-note")
    assert css(browser, "#opt-normalize")[0].get_attribute("value") == "train"
    Select(css(browser, "#opt-normalize")[0]).select_by_value("none")


def _overflow(driver) -> dict:
    return driver.execute_script("""
      const w = window.innerWidth, out = {page: document.documentElement.scrollWidth - w, off: []};
      for (const sel of ['#api-key', '#key-save', '#tab-explain', '#tab-self', '#tab-index', 'a.doclink']) {
        const r = document.querySelector(sel).getBoundingClientRect();
        if (r.left < 0 || r.right > w + 0.5 || r.width === 0) out.off.push(sel);
      }
      return out;""")


def test_narrow_windows(browser, server, api):
    """Below 1100 px nothing runs off the page, the top bar keeps its controls, and (down to 800 px) the
    answer starts on the first screen instead of under the held-out list."""
    first = api.get("/queries", params={"limit": 1}).json()["items"][0]["id"]
    try:
        for width in (1000, 800, 560):
            browser.set_window_size(width, 900)
            browser.get(server + "/#/index")  # a new hash: the explain route runs again
            browser.get(server + "/#/explain/query/0")
            results_for(browser, "held-out", first)
            assert _overflow(browser) == {"page": 0, "off": []}, (width, "explain")
            top, right = browser.execute_script(
                "const r = document.querySelector('#proponents').getBoundingClientRect(); return [r.top, r.right]")
            assert right <= browser.execute_script("return window.innerWidth") + 0.5, width
            if width >= 800:
                assert top < browser.execute_script("return window.innerHeight"), (width, top)
            probs = css(browser, "#query-summary .prob-label")
            assert probs and all(el.size["width"] > 0 for el in probs), width
            if width == 800:
                screenshot_at(browser, "narrow-800")
            for view, ready in (("self", "#si-table tbody tr[data-id]"), ("index", "#index-panel .card")):
                browser.get(server + f"/#/{view}")
                wait_for(lambda: css(browser, ready), what=f"{view} at {width}px")
                time.sleep(0.3)  # the histogram redraws after a resize
                assert _overflow(browser) == {"page": 0, "off": []}, (width, view)
    finally:
        browser.set_window_size(1440, 1000)


def _blocks_table_reachable(driver) -> dict:
    """The traced-blocks table inside its own box: the box within the page, and the table's last column
    visible once the box is scrolled to its end (a box narrower than the table scrolls, never clips)."""
    return driver.execute_script("""
      const card = [...document.querySelectorAll('#index-panel .card')]
        .find((c) => c.querySelector('h2').textContent.startsWith('Traced blocks'));
      const table = card.querySelector('table'), box = table.parentElement;
      box.scrollLeft = box.scrollWidth;
      const b = box.getBoundingClientRect(), last = table.querySelector('thead th:last-child').getBoundingClientRect();
      const style = getComputedStyle(box);
      return {boxInPage: b.left >= 0 && b.right <= document.documentElement.clientWidth + 0.5,
              lastVisible: last.right <= b.right + 0.5 && last.left >= b.left - 0.5,
              scrollsIfNeeded: table.getBoundingClientRect().width <= b.width + 0.5 || style.overflowX === 'auto'};""")


def _clipped_select_options(driver, selectors: str) -> list[str]:
    """Option texts wider than their select's text area (canvas-measured in the select's font)."""
    return driver.execute_script("""
      const ctx = document.createElement('canvas').getContext('2d'), out = [];
      for (const sel of document.querySelectorAll(arguments[0])) {
        const st = getComputedStyle(sel);
        ctx.font = `${st.fontWeight} ${st.fontSize} ${st.fontFamily}`;
        const room = sel.clientWidth - parseFloat(st.paddingLeft) - parseFloat(st.paddingRight) - 18;  // the arrow
        for (const o of sel.options) if (ctx.measureText(o.text).width > room) out.push(`${sel.id}: ${o.text}`);
      }
      return out;""", selectors)


def test_wide_windows_and_select_texts(browser, server, api):
    """At 1280 and 1440 px no view is wider than the page and the traced-blocks table is whole (or scrolls)
    inside its card; at 800 px the query options' selects show their whole texts (issue 22, item 7)."""
    first = api.get("/queries", params={"limit": 1}).json()["items"][0]["id"]
    try:
        for width in (1280, 1440):
            browser.set_window_size(width, 1000)
            browser.get(server + "/#/index")
            browser.get(server + "/#/explain/query/0")
            results_for(browser, "held-out", first)
            for view, ready in (("explain", "#proponents li.hit"), ("self", "#si-table tbody tr[data-id]"),
                                ("index", "#index-panel .card table tbody tr")):
                browser.get(server + f"/#/{view}" + ("/query/0" if view == "explain" else ""))
                wait_for(lambda sel=ready: css(browser, sel), what=f"{view} at {width}px")
                time.sleep(0.3)  # the histogram redraws after a resize
                sizes = browser.execute_script(
                    "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
                assert sizes[0] <= sizes[1], (width, view, sizes)
                assert _overflow(browser) == {"page": 0, "off": []}, (width, view)
            assert _blocks_table_reachable(browser) == {"boxInPage": True, "lastVisible": True,
                                                        "scrollsIfNeeded": True}, width
        browser.set_window_size(800, 1000)
        browser.get(server + "/#/explain")
        wait_for(lambda: len(css(browser, "#opt-metric option")) > 1, what="the options at 800 px")
        if not css(browser, "#options")[0].get_attribute("open"):
            css(browser, "#options summary")[0].click()
        assert _clipped_select_options(browser, "#options select") == []
    finally:
        browser.set_window_size(1440, 1000)


def screenshot_at(driver, name: str) -> None:
    """Like screenshot(), at the window's current width."""
    out = _screenshot_dir()
    if out is not None:
        driver.save_screenshot(str(out / f"dashboard-{name}.png"))


def test_api_docs_render_offline(browser, server, api_key):
    """/docs (Swagger UI) and /redoc (ReDoc) load their files from the service, not a CDN (the browser has
    no network), before any key is typed; the OpenAPI document comes with the key the dashboard saved."""
    from selenium.common.exceptions import WebDriverException

    with pytest.raises(WebDriverException):  # the browser really is offline
        browser.get("https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js")
    for path in ("/docs", "/redoc", "/dashboard/vendor/swagger-ui-bundle.js", "/dashboard/vendor/redoc.standalone.js"):
        assert httpx.get(server + path).status_code == 200, path  # no key needed: no data in them
    assert httpx.get(server + "/openapi.json").status_code == 401  # the task's schema and examples: key needed
    browser.get(server + "/")
    browser.execute_script("localStorage.setItem('tracin.apiKey', arguments[0])", api_key)
    browser.get_log("browser")  # drop earlier messages
    body = lambda: css(browser, "body")[0].text  # noqa: E731
    browser.get(server + "/docs")
    wait_for(lambda: len(css(browser, "#swagger-ui .opblock")) >= 8, what="Swagger UI operations")
    text = body()
    for route in ("/influence", "/self-influence/top", "/examples/{id}", "/queries", "/index"):
        assert route in text, route
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(u.endswith("/dashboard/vendor/swagger-ui-bundle.js") for u in urls)
    assert all(u.startswith(server) or u.startswith("data:") for u in urls), urls
    refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not refused, refused
    browser.get(server + "/redoc")
    wait_for(lambda: "/self-influence/top" in body() and "/influence" in body(), what="ReDoc operations")
    entries = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.responseStatus])")
    assert any(u.endswith("/dashboard/vendor/redoc.standalone.js") for u, _ in entries)
    # ReDoc's footer logo ("API docs by Redocly") is served inline (service/docs.py): nothing is asked of a
    # CDN, not even a request the page's CSP would refuse.
    assert all(u.startswith(server) or u.startswith("data:") for u, _ in entries), entries
    assert not [e["message"] for e in browser.get_log("browser") if "cdn.redoc.ly" in e["message"]]
    # Without a saved key the page still loads and says where to enter one.
    browser.execute_script("localStorage.removeItem('tracin.apiKey')")
    browser.get(server + "/docs")
    note = wait_for(lambda: css(browser, "#tracin-docs-key"), what="API key note")[0].text
    assert "needs an API key" in note and "dashboard" in note
    browser.execute_script("localStorage.setItem('tracin.apiKey', arguments[0])", api_key)
    browser.get(server + "/#/explain")  # back to the dashboard for the tests that follow
    wait_for(lambda: css(browser, "#query-list .query-item"), what="dashboard again")


def test_bad_inputs_show_visible_errors(browser, server, tmp_path):
    css(browser, "#tab-explain")[0].click()
    wait_for(lambda: css(browser, "#view-explain")[0].is_displayed(), what="explain view")
    # 1. An example the API rejects: the banner names the field.
    details = css(browser, "#raw-json")[0]
    if not details.get_attribute("open"):
        css(browser, "#raw-json summary")[0].click()
    raw = css(browser, "#raw-example")[0]
    raw.clear()
    raw.send_keys('{"pixels": [1, 2, 3]}')
    css(browser, "#raw-run")[0].click()
    shown = wait_for(lambda: banner(browser), what="422 banner")
    assert shown["status"] == "422" and "example.pixels" in shown["text"]
    screenshot(browser, "error")
    # 2. A file that is not an image: refused in the browser, before any request.
    css(browser, "#error-close")[0].click()
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a PNG")
    css(browser, "#upload")[0].send_keys(str(not_image))
    shown = wait_for(lambda: banner(browser), what="upload banner")
    assert shown["code"] == "bad_input" and "notes.png is not an image" in shown["text"]
    # 3. A wrong API key: 401 from the API, shown with a hint to fix the key.
    key = css(browser, "#api-key")[0]
    key.clear()
    key.send_keys("wrong-key")
    css(browser, "#key-save")[0].click()
    shown = wait_for(lambda: (b := banner(browser)) and b["status"] == "401" and b, what="401 banner")
    assert "invalid bearer token" in shown["text"] and "API key" in shown["text"]


# -- a text task, served without an API key ----------------------------------------------------------

@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    from indexer.config import parse_config
    from indexer.build.pipeline import build_index
    from tests.dashboard_tasks import TinyTextTask

    work = tmp_path_factory.mktemp("text-task")
    checkpoints = train_checkpoints(TinyTextTask(), work / "run")
    data = {"task": "tests.dashboard_tasks:TinyTextTask", "checkpoints": [{"path": str(p)} for p in checkpoints],
            "projection": {"kind": "exact", "dim": 16, "seed": 0},
            "index": {"factory": "IVF2,Flat", "batch_size": 8, "search_params": {"nprobe": 1}}}  # approximate
    index_dir = build_index(parse_config(data, work), work / "index").path
    proc = start_server(index_dir, env={"TRACIN_API_KEY": "", "TRACIN_TORCH_THREADS": "1"})
    try:
        yield proc.base_url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def adamw_server(tmp_path_factory):
    """The digits demo trained with AdamW (two checkpoints with their optimizer state): an adam-formula index."""
    from indexer.build.pipeline import build_index
    from indexer.config import load_config
    from indexer.demo.digits import train_digits

    work = tmp_path_factory.mktemp("digits-adamw")
    config = train_digits(work / "run", epochs=2, checkpoints=2, optimizer="adamw")
    index_dir = build_index(load_config(config), work / "index").path
    proc = start_server(index_dir, env={"TRACIN_API_KEY": "", "TRACIN_TORCH_THREADS": "1"})
    try:
        yield proc.base_url
    finally:
        proc.stop()


def test_index_panel_of_an_adamw_index_shows_the_adam_formula(browser, adamw_server):
    info = httpx.get(adamw_server + "/index").json()
    assert info["optimizer"]["formula"] == "adam" and "optimizer" in info["optimizer"]["why"].lower()
    browser.get(adamw_server + "/")
    one(browser, "#tab-index").click()
    wait_for(lambda: css(browser, "#optimizer-card"), what="index panel")
    _assert_optimizer_shown(browser, info)
    assert "Γ = 1/(√v̂ + ε)" in one(browser, "#optimizer-card").text
    screenshot(browser, "index-adamw")


def test_text_task(browser, text_server):
    browser.get(text_server + "/#/explain")
    wait_for(lambda: css(browser, "#query-list .query-item"), what="held-out articles")
    assert banner(browser) is None and css(browser, "#custom-text")[0].is_displayed()
    queries = httpx.get(text_server + "/queries").json()["items"]
    assert queries[0]["display"]["title"] in css(browser, "#query-list .query-item")[0].text
    css(browser, "#query-list .query-item")[0].click()
    sent = results_for(browser, "held-out", queries[0]["id"])
    answer = httpx.post(text_server + "/influence", json=sent).json()
    assert_hits_equal(browser, answer)
    titles = [el.text for el in css(browser, "#proponents li.hit .snippet-title")]
    assert titles == [h["display"]["title"] for h in answer["proponents"]]
    screenshot(browser, "text-explain")
    # Your own text.
    box = css(browser, "#custom-text")[0]
    box.clear()
    box.send_keys("Striker scores a late penalty in the cup final")
    css(browser, "#explain-custom")[0].click()
    sent = results_for(browser, "text", "your example")
    assert sent["example"] == {"text": "Striker scores a late penalty in the cup final"}
    assert_hits_equal(browser, httpx.post(text_server + "/influence", json=sent).json())
    # An empty text is refused in the page.
    box.clear()
    css(browser, "#explain-custom")[0].click()
    shown = wait_for(lambda: banner(browser), what="empty text banner")
    assert shown["code"] == "bad_input" and "text is empty" in shown["text"]


def test_index_panel_of_an_approximate_index(browser, text_server):
    info = httpx.get(text_server + "/index").json()
    assert info["approximate"] and "recall_at_10" in info["faiss"]
    recall = info["faiss"]["recall_at_10"]
    css(browser, "#tab-index")[0].click()
    panel = wait_for(lambda: css(browser, "#index-panel .card") and css(browser, "#index-panel")[0], what="index panel")
    text = panel.text
    assert "IVF2,Flat" in text and "approximate" in text and '{"nprobe":1}' in text
    assert f"proponents {recall['proponents']:.4f}" in text and f"opponents {recall['opponents']:.4f}" in text
    assert "measured recall (min)" in text
    screenshot(browser, "text-index")


@pytest.fixture(scope="module")
def image_file_server(tmp_path_factory):
    from indexer.config import parse_config
    from indexer.build.pipeline import build_index
    from tests.dashboard_tasks import TinyImageFileTask

    work = tmp_path_factory.mktemp("image-file-task")
    task = TinyImageFileTask()
    checkpoints = train_checkpoints(task, work / "run")
    data = {"task": "tests.dashboard_tasks:TinyImageFileTask", "checkpoints": [{"path": str(p)} for p in checkpoints],
            "projection": {"kind": "exact", "dim": 16, "seed": 0}, "index": {"batch_size": 16}}
    index_dir = build_index(parse_config(data, work), work / "index").path
    proc = start_server(index_dir, env={"TRACIN_API_KEY": "", "TRACIN_TORCH_THREADS": "1"})
    try:
        yield proc.base_url
    finally:
        proc.stop()


def test_an_image_file_task_uploads_the_file_as_it_is(browser, image_file_server, tmp_path):
    """A task whose example is a base64 PNG (torchvision.image_classification's schema): the page offers an upload,
    sends the file unchanged as a data URL, and shows thumbnails in its lists."""
    import base64

    from indexer.images import png_bytes

    browser.get(image_file_server + "/#/explain")
    wait_for(lambda: css(browser, "#query-list .query-item img"), what="held-out thumbnails")
    assert not css(browser, "#custom-text") and banner(browser) is None
    queries = httpx.get(image_file_server + "/queries").json()["items"]
    grid = TinyImageFileTask_pixels(queries)
    path = tmp_path / "digit.png"
    path.write_bytes(png_bytes(grid))
    css(browser, "#upload-image")[0].send_keys(str(path))
    sent = results_for(browser, "upload", "digit.png")
    assert sent["example"] == {"image": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()}
    assert_hits_equal(browser, httpx.post(image_file_server + "/influence", json=sent).json())
    assert css(browser, "#image-file-preview")[0].is_displayed()
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not an image")
    css(browser, "#upload-image")[0].send_keys(str(not_image))
    shown = wait_for(lambda: banner(browser), what="upload banner")
    assert shown["code"] == "bad_input" and "not a PNG or JPEG" in shown["text"]


def TinyImageFileTask_pixels(queries):  # noqa: N802 - the first held-out digit's pixels, decoded from its PNG
    import base64

    from indexer.demo.fashion_mnist import decode_png

    return decode_png(base64.b64decode(queries[0]["example"]["image"].split(",", 1)[1]))


# -- a tabular task (the README's wine walkthrough) and long class names, served without a key ----------

def _serve_task(tmp_path_factory, name: str, ref: str, task, kind: str = "exact"):
    from indexer.config import parse_config
    from indexer.build.pipeline import build_index

    work = tmp_path_factory.mktemp(name)
    checkpoints = train_checkpoints(task, work / "run")
    data = {"task": ref, "checkpoints": [{"path": str(p)} for p in checkpoints],
            "projection": {"kind": kind, "dim": 32, "seed": 0}, "index": {"factory": "Flat", "batch_size": 256}}
    index_dir = build_index(parse_config(data, work), work / "index").path
    return start_server(index_dir, env={"TRACIN_API_KEY": "", "TRACIN_TORCH_THREADS": "1"})


@pytest.fixture(scope="module")
def wine_server(tmp_path_factory):
    from tests.dashboard_tasks import TinyWineTask

    proc = _serve_task(tmp_path_factory, "wine", "tests.dashboard_tasks:TinyWineTask", TinyWineTask())
    try:
        yield proc.base_url
    finally:
        proc.stop()


def _floats(cells) -> list[float]:
    return [float(td.get_attribute("title")) for td in cells]


def test_tabular_task_shows_fields_as_tables(browser, wine_server):
    """No image or text field: held-out rows, the query's feature values and the hits' display fields are tables."""
    queries = httpx.get(wine_server + "/queries", params={"limit": 100}).json()["items"]
    browser.get(wine_server + "/#/explain")
    rows = wait_for(lambda: len(css(browser, "#query-list tr.query-item")) == len(queries) == 28
                    and css(browser, "#query-list tr.query-item"), what="28 held-out rows")
    for row, query in zip(rows, queries):
        cells = row.find_elements("css selector", "td")
        assert cells[0].text == query["id"]
        assert _floats(cells[2:]) == pytest.approx(query["example"]["measurements"], rel=1e-12)
    texts = [row.text for row in rows]
    assert len(set(texts)) == len(texts), "held-out rows can be told apart"
    headers = [th.text for th in css(browser, "#query-list thead tr:last-child th")]
    assert headers == ["id", "label"] + [str(i) for i in range(13)]
    assert "measurements" in css(browser, "#query-list thead tr:first-child")[0].text
    rows[3].click()
    sent = results_for(browser, "held-out", queries[3]["id"])
    assert sent["example"] == queries[3]["example"]
    values = css(browser, "#query-fields tbody td")
    assert _floats(values) == pytest.approx(queries[3]["example"]["measurements"], rel=1e-12)
    answer = httpx.post(wine_server + "/influence", json=sent).json()
    assert_hits_equal(browser, answer)
    for kind in ("proponents", "opponents"):
        for li, hit in zip(css(browser, f"#{kind} li.hit"), answer[kind]):
            assert [th.text for th in li.find_elements("css selector", "table.fields th")] == ["alcohol", "color_intensity"]
            shown = _floats(li.find_elements("css selector", "table.fields td"))
            assert shown == pytest.approx([hit["display"]["alcohol"], hit["display"]["color_intensity"]])
    assert not css(browser, ".thumb-none"), "no grey 'no preview' boxes"
    screenshot(browser, "tabular-explain")
    css(browser, "#tab-self")[0].click()
    wait_for(lambda: len(css(browser, "#si-table tbody tr[data-id]")) == 50, what="self-influence rows")
    top = httpx.get(wine_server + "/label-review", params={"k": 1}).json()["items"][0]
    first = css(browser, "#si-table tbody tr[data-id]")[0]
    assert _floats(first.find_elements("css selector", "table.fields td")) == pytest.approx(
        [top["display"]["alcohol"], top["display"]["color_intensity"]])
    assert not css(browser, ".thumb-none")


@pytest.fixture(scope="module")
def long_names_server(tmp_path_factory):
    from tests.dashboard_tasks import LongNamesDigitsTask

    proc = _serve_task(tmp_path_factory, "long-names", "tests.dashboard_tasks:LongNamesDigitsTask",
                       LongNamesDigitsTask(), kind="sketch")
    try:
        yield proc.base_url
    finally:
        proc.stop()


def _clipped(driver, selector: str, container: str | None = None) -> list[str]:
    """Texts of `selector` elements cut off: wider than their box, or outside `container` (an ancestor)."""
    return driver.execute_script("""
      const [sel, box] = arguments; const out = [];
      for (const el of document.querySelectorAll(sel)) {
        let cut = el.scrollWidth > el.clientWidth + 0.5;
        const outer = box && el.closest(box);
        if (outer) {
          const r = el.getBoundingClientRect(), o = outer.getBoundingClientRect();
          cut = cut || r.left < o.left - 0.5 || r.right > o.right + 0.5;
        }
        if (cut) out.push(el.textContent);
      }
      return out;""", selector, container)


def test_long_class_names_are_not_clipped(browser, long_names_server):
    from tests.dashboard_tasks import FASHION_NAMES

    queries = httpx.get(long_names_server + "/queries", params={"limit": 48}).json()["items"]
    try:
        for width in (1440, 800):
            browser.set_window_size(width, 1000)
            browser.get(long_names_server + "/#/index")
            browser.get(long_names_server + "/#/explain/query/0")
            results_for(browser, "held-out", queries[0]["id"])
            labels = css(browser, "#query-list .query-item .query-label")
            assert [el.text for el in labels] == [FASHION_NAMES[q["label"]] for q in queries]
            assert _clipped(browser, "#query-list .query-label", ".query-item") == [], width
            names = [el.get_attribute("textContent") for el in css(browser, "#query-summary .prob-label")]
            assert sorted(names) == sorted(FASHION_NAMES)
            assert _clipped(browser, "#query-summary .prob-label") == [], width
            if width == 800:
                screenshot_at(browser, "long-names-800")
    finally:
        browser.set_window_size(1440, 1000)


def test_metric_normalisation_and_checkpoint_breakdown(browser, server, api, api_key):
    """Issue 11: the metric and normalisation controls reach the request, every hit shows its per-checkpoint
    terms as bars (re-ranked answers are exact), and a line counts the hits in the top 1% by self-influence."""
    from selenium.webdriver.support.ui import Select

    browser.set_window_size(1440, 1000)
    browser.get(server + "/#/explain")
    browser.execute_script("localStorage.setItem('tracin.apiKey', arguments[0])", api_key)  # earlier tests change it
    browser.refresh()
    queries = api.get("/queries", params={"limit": 2}).json()["items"]
    if not css(browser, "#options")[0].get_attribute("open"):
        css(browser, "#options summary")[0].click()
    wait_for(lambda: len(css(browser, "#opt-metric option")) > 1, what="the task's metrics")
    metrics = [o.get_attribute("value") for o in css(browser, "#opt-metric option")]
    assert metrics == ["loss", "logit", "log_probability", "margin"]
    Select(css(browser, "#opt-metric")[0]).select_by_value("margin")
    Select(css(browser, "#opt-normalize")[0]).select_by_value("train")
    css(browser, "#query-list .query-item")[1].click()
    sent = results_for(browser, "held-out", queries[1]["id"])
    assert sent["metric"] == "margin" and sent["normalize"] == "train"
    answer = api.post("/influence", json=sent).json()
    assert answer["exact"] is True and answer["metric"]["name"] == "margin"
    assert_hits_equal(browser, answer)
    checkpoints = len(api.get("/index").json()["checkpoints"])
    for kind in ("proponents", "opponents"):
        for li in css(browser, f"#{kind} li.hit"):
            assert len(li.find_elements("css selector", ".ckpt-bars .ckpt")) == checkpoints
    count = api.get("/index").json()["count"]
    top = max(1, -(-count // 100))
    shown = answer["proponents"] + answer["opponents"]
    in_top = sum(1 for h in shown if h["self_influence_rank"] <= top)
    note = css(browser, "#hits-note")[0].text
    assert f"{in_top} of the {len(shown)} hits shown are among the top 1%" in note and "margin" in note
    Select(css(browser, "#opt-metric")[0]).select_by_value("loss")
    Select(css(browser, "#opt-normalize")[0]).select_by_value("none")
