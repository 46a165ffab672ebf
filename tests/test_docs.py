"""Docs that match the code (issue 22, item 9): every projection a block can get is documented, and the
dashboard screenshots in README.md and docs/ are the browser tests' own, so that they cannot drift from
the dashboard: every picture the docs show is written by a `screenshot(...)` call of
tests/test_dashboard_browser.py, every dashboard picture in docs/ is shown somewhere, and the dashboard's
files have not changed since the pictures were taken (docs/dashboard-screenshots.sha256, written with
them). No browser is needed here. To take them again:

    tracin demo --out /tmp/demo --no-serve
    TRACIN_DASHBOARD_INDEX=/tmp/demo/index TRACIN_SCREENSHOTS=docs pytest tests/test_dashboard_browser.py
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
STATIC = REPO / "service" / "static"
DIGEST_FILE = "dashboard-screenshots.sha256"
AGAIN = ("take the screenshots again: tracin demo --out /tmp/demo --no-serve && TRACIN_DASHBOARD_INDEX=/tmp/demo/index "
         "TRACIN_SCREENSHOTS=docs pytest tests/test_dashboard_browser.py tests/test_dashboard_sets_browser.py")


def static_digest() -> str:
    """sha256sum-style lines for every file of the dashboard (service/static)."""
    return "".join(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(REPO).as_posix()}\n"
                   for path in sorted(STATIC.rglob("*")) if path.is_file())


def _shown() -> dict[str, Path]:
    """dashboard-*.png named in README.md and docs/*.md -> the document showing it."""
    out = {}
    for doc in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        for name in re.findall(r"\((?:docs/)?(dashboard-[\w-]+\.png)\)", doc.read_text(encoding="utf-8")):
            out[name] = doc
    return out


def _taken() -> set[str]:
    """The pictures the browser tests write."""
    source = "".join((REPO / "tests" / name).read_text(encoding="utf-8")
                     for name in ("test_dashboard_browser.py", "test_dashboard_sets_browser.py"))
    return {f"dashboard-{name}.png" for name in re.findall(r'screenshot(?:_at)?\(browser, "([\w-]+)"\)', source)}


def test_every_picture_shown_is_taken_by_the_browser_tests():
    shown, taken = _shown(), _taken()
    assert shown, "README.md and docs/ show dashboard screenshots"
    assert sorted(set(shown) - taken) == [], "shown but not written by the browser tests"
    assert sorted(name for name in shown if not (DOCS / name).is_file()) == []


def test_every_dashboard_picture_in_docs_is_shown():
    stale = sorted(p.name for p in DOCS.glob("dashboard-*.png") if p.name not in _shown())
    assert stale == [], f"docs/ holds dashboard pictures no document shows: {stale}"


def test_the_pictures_show_the_dashboard_as_it_is():
    recorded = DOCS / DIGEST_FILE
    assert recorded.is_file(), f"docs/{DIGEST_FILE} is missing: {AGAIN}"
    assert recorded.read_text() == static_digest(), f"the dashboard changed since its screenshots were taken: {AGAIN}"


def test_every_projection_a_block_can_get_is_documented():
    """The config's kinds and `place` (a block with at most `dim` entries, whatever the kind), as the
    manifest's `layers[].projection` names them, in README.md and the kinds table of docs/design.md."""
    import inspect

    from indexer.sketch import projection

    names = set(projection.KINDS) | set(re.findall(r'BlockProjector\(block, "(\w+)"', inspect.getsource(projection)))
    assert "place" in names
    design = (DOCS / "design.md").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = {m for m in re.findall(r"^\| `(\w+)`", design, flags=re.M)}
    assert sorted(names - table) == [], "projections missing from the kinds table of docs/design.md"
    assert sorted(n for n in names if f"`{n}`" not in readme and f'"{n}"' not in readme) == [], "missing from README.md"
