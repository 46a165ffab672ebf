"""The dashboard's Sets view and per-layer terms (issue 20), end to end: Debian chromium (headless, Selenium)
against a real `tracin serve` with an API key, the same set-up as tests/test_dashboard_browser.py.

Selecting "all misclassified" or "all of class c" selects exactly the held-out examples GET /queries says; the
set's answer is the API's for the same body; each hit names the members it affects most (its largest member
scores); the answer exports as CSV and JSON with every member's score; per-layer terms open on demand and
are the API's."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from tests import test_dashboard_browser as dashboard
from tests.test_dashboard_browser import assert_hits_equal, banner, css, screenshot, wait_for

# the same fixtures (a real `tracin serve` with an API key, one chromium session) and skip conditions
pytestmark = dashboard.pytestmark
api_key, server, api, browser = dashboard.api_key, dashboard.server, dashboard.api, dashboard.browser


def _open_sets(browser, server, api_key):
    browser.set_window_size(1440, 1000)
    browser.get(server + "/")
    browser.execute_script("localStorage.setItem('tracin.apiKey', arguments[0])", api_key)
    browser.get(server + "/#/set")
    browser.refresh()
    return wait_for(lambda: css(browser, "#set-list .set-item"), what="held-out examples in the Sets view")


def _selected(browser) -> list[str]:
    return [b.get_attribute("data-id") for b in css(browser, "#set-list .set-item[aria-pressed=true]")]


def _set_answer(browser, members: list[str]):
    def ready():
        box = css(browser, "#set-results")[0]
        if box.get_attribute("data-members") == ",".join(members) and css(browser, "#set-proponents li.hit") \
                and box.get_attribute("aria-busy") is None:
            return box
        return None

    return wait_for(ready, what="the set's answer")


def _rendered(browser, kind: str) -> list[tuple[str, float]]:
    return [(li.get_attribute("data-id"), float(li.get_attribute("data-score")))
            for li in css(browser, f"#set-{kind} li.hit")]


def _top_members(hit: dict, ids: list[str], sign: int, top: int = 3) -> list[str]:
    scores = [(s, m) for m, s in enumerate(hit["member_scores"]) if sign * s > 0]
    scores.sort(key=lambda x: -sign * x[0])
    return [ids[m] for _, m in scores[:top]]


def test_explain_all_misclassified_held_out_examples_as_one_set(browser, server, api, api_key):
    _open_sets(browser, server, api_key)
    page = api.get("/queries", params={"limit": 1000, "predictions": "true"}).json()
    items = page["items"]
    assert all(q["prediction"] is not None for q in items)
    wrong = [q for q in items if q["prediction"]["label"] != q["label"]]
    assert wrong, "the briefly trained digits model misclassifies some held-out examples"
    css(browser, "#set-misclassified")[0].click()
    wait_for(lambda: _selected(browser) == [q["id"] for q in wrong], what="the misclassified examples selected")
    assert f"{len(wrong)} misclassified" in css(browser, "#set-count")[0].text
    k = css(browser, "#set-k")[0]
    k.clear()
    k.send_keys("6")
    css(browser, "#set-run")[0].click()
    members = [q["id"] for q in wrong]
    _set_answer(browser, members)
    body = {"examples": [q["example"] for q in wrong], "aggregate": "sum", "k": 6, "member_scores": True,
            "labels": [q["label"] for q in wrong]}
    answer = api.post("/influence", json=body).json()
    assert answer["exact"] is True and answer["set"]["size"] == len(wrong)
    for kind in ("proponents", "opponents"):
        shown = _rendered(browser, kind)
        assert [i for i, _ in shown] == [h["id"] for h in answer[kind]], kind
        assert [s for _, s in shown] == pytest.approx([h["score"] for h in answer[kind]], rel=1e-6)
        sign = 1 if kind == "proponents" else -1
        for li, hit in zip(css(browser, f"#set-{kind} li.hit"), answer[kind]):
            affects = li.find_elements("css selector", ".affects")
            expected = _top_members(hit, members, sign)
            assert (affects[0].get_attribute("data-members").split(",") if affects else []) == expected, hit["id"]
    summary = css(browser, "#set-summary")[0].text
    assert f"{len(wrong)} held-out examples" in summary and "exact TracIn" in summary
    assert banner(browser) is None
    css(browser, "#set-opponents details.blocks summary")[0].click()
    screenshot(browser, "sets")


def test_all_of_a_class_mean_aggregate_and_exports(browser, server, api, api_key, tmp_path: Path):
    from selenium.webdriver.support.ui import Select

    _open_sets(browser, server, api_key)
    items = api.get("/queries", params={"limit": 1000, "predictions": "true"}).json()["items"]
    Select(css(browser, "#set-class")[0]).select_by_value("3")
    css(browser, "#set-class-add")[0].click()
    of_class = [q for q in items if q["label"] == 3]
    wait_for(lambda: _selected(browser) == [q["id"] for q in of_class], what="class 3 selected")
    Select(css(browser, "#set-aggregate")[0]).select_by_value("mean")
    css(browser, "#set-run")[0].click()
    members = [q["id"] for q in of_class]
    _set_answer(browser, members)
    body = {"examples": [q["example"] for q in of_class], "aggregate": "mean", "k": 10, "member_scores": True,
            "labels": [3] * len(of_class)}
    answer = api.post("/influence", json=body).json()
    assert answer["set"]["aggregate"] == "mean"
    for kind in ("proponents", "opponents"):
        assert [i for i, _ in _rendered(browser, kind)] == [h["id"] for h in answer[kind]]
    browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    name = f"influence-set-{len(of_class)}-mean"
    css(browser, "#set-export-csv")[0].click()
    path = tmp_path / f"{name}.csv"
    text = wait_for(lambda: path.is_file() and path.read_text().endswith("\n") and path.read_text(), what="CSV")
    rows = list(csv.DictReader(io.StringIO(text)))
    hits = [("proponents", h) for h in answer["proponents"]] + [("opponents", h) for h in answer["opponents"]]
    assert len(rows) == len(hits)
    for row, (side, hit) in zip(rows, hits):
        assert row["side"] == side and row["id"] == hit["id"]
        assert float(row["score"]) == pytest.approx(hit["score"], rel=1e-9)
        for m, member in enumerate(members):
            assert float(row[f"member.{member}"]) == pytest.approx(hit["member_scores"][m], rel=1e-9)
        for block, term in hit["blocks"].items():
            assert float(row[f"block.{block}"]) == pytest.approx(term, rel=1e-9)
        assert sum(float(row[f"member.{m}"]) for m in members) == pytest.approx(hit["score"], rel=1e-6, abs=1e-12)
    css(browser, "#set-export-json")[0].click()
    json_path = tmp_path / f"{name}.json"
    data = wait_for(lambda: json_path.is_file() and _json_or_none(json_path), what="JSON")
    assert data["members"] == members and data["request"]["aggregate"] == "mean"
    assert [h["id"] for h in data["answer"]["opponents"]] == [h["id"] for h in answer["opponents"]]
    assert data["answer"]["opponents"][0]["member_scores"] == pytest.approx(answer["opponents"][0]["member_scores"])


def test_per_layer_terms_open_on_demand(browser, server, api, api_key):
    _open_sets(browser, server, api_key)
    browser.get(server + "/#/explain/query/0")
    wait_for(lambda: css(browser, "#proponents li.hit") and
             css(browser, "#results-body")[0].get_attribute("data-source") == "held-out", what="an answer")
    sent = json.loads(css(browser, "#results-body")[0].get_attribute("data-request"))
    answer = api.post("/influence", json=sent).json()
    assert_hits_equal(browser, answer)
    first = css(browser, "#proponents li.hit")[0]
    details = first.find_elements("css selector", "details.blocks")[0]
    assert details.get_attribute("open") is None  # closed until asked for
    terms = first.find_elements("css selector", ".block-term")
    assert not any(t.is_displayed() for t in terms)
    details.find_elements("css selector", "summary")[0].click()
    wait_for(lambda: all(t.is_displayed() for t in terms), what="per-layer terms shown")
    assert "#/explain/query/0" in browser.current_url  # opening the terms does not explain the hit
    shown = {t.get_attribute("data-block"): float(t.get_attribute("data-term")) for t in terms}
    hit = answer["proponents"][0]
    assert shown == pytest.approx(hit["blocks"], rel=1e-9)
    assert sum(shown.values()) == pytest.approx(hit["score"], rel=1e-9)
    assert set(shown) == {layer["name"] for layer in api.get("/index").json()["layers"]}


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_the_digits_schema_names_the_member_at_fault(api):
    """The issue's example: mixed train_ids and examples, member 7 of the wrong schema -> 422 examples.7.pixels."""
    examples = [q["example"] for q in api.get("/queries", params={"limit": 8}).json()["items"]]
    bad = examples[:7] + [{"pixels": [1, 2, 3]}]
    for body in ({"examples": bad, "train_ids": ["train-1"], "aggregate": "sum"}, {"examples": bad}):
        response = api.post("/influence", json=body)
        assert response.status_code == 422 and response.json()["detail"][0]["field"] == "examples.7.pixels"
    response = api.post("/influence", json={"examples": examples[:2], "train_ids": ["train-1", "no-such-id"],
                                            "aggregate": "mean"})
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "train_ids.1"
