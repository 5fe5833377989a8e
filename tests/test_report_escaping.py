"""The report of a hostile run: every string from a model, data or artifact shows as text, never as markup.

A run directory is written with markup in the model name, the unit names (which are also the
Optuna study's parameter names), the data paths, the space, the study name, the trial sources,
the notes, the evaluation, the staged history and the frontier rows. ``autocompress report``
draws it; the page is then parsed as a browser would tokenise it and must hold exactly the
elements the report makes itself (no injected tag, no event-handler attribute, every
``<script>`` one of ours, none closed early), and the figure data inside the scripts must hold
the hostile strings HTML-escaped (plotly renders an HTML subset in its text).
"""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import report_run
from report_run import build_run

from autocompress.artifacts import read_artifact, write_artifact
from autocompress.cli import main

EVIL = "<script>alert(1)</script>"
IMG = "</script><img src=x onerror=alert(2)>"
QUOTE = "\" onmouseover=\"alert(3)\" x=\"<b>'"
HOSTILE = (EVIL, IMG, QUOTE)
# Every element the report itself writes; anything else on the page was injected.
OURS = {"html", "head", "meta", "title", "style", "script", "body", "header", "div", "h1", "h2", "h3", "p", "main",
        "nav", "strong", "ol", "ul", "li", "a", "section", "table", "thead", "tbody", "tr", "th", "td", "footer"}
# What plotly may find in a figure's text: the report's own line breaks and hover boxes.
PLOTLY_MARKUP = re.compile(r"<br>|<extra>|</extra>")


class _Page(HTMLParser):
    """Tags, attributes and script bodies of a page, tokenised as a browser does (script is raw text)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.text: list[str] = []
        self.comments: list[str] = []
        self._in_script: dict | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = dict(attrs)
            self.scripts.append((self._in_script, ""))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None

    def handle_comment(self, data):
        self.comments.append(data)

    def handle_data(self, data):
        if self._in_script is not None:
            attrs, body = self.scripts[-1]
            self.scripts[-1] = (attrs, body + data)
        else:
            self.text.append(data)


def _hostile_run(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every artifact of a run, with hostile strings wherever a model, data or a user names something."""
    monkeypatch.setattr(report_run, "unit_name", lambda i: f"model.layers.{i}.{HOSTILE[i % 3]}")
    run = build_run(root / "run", model=EVIL)
    edits = {
        "profile.json": ("profile", 1, lambda d: d.update(data=f"/data/{IMG}.txt", space=QUOTE)),
        "schedule.json": ("schedule", 1, lambda d: d.update(meta={"model": EVIL, "data": f"/data/{IMG}.txt"})),
        "search.json": ("search", 1, _hostile_search),
        "eval.json": ("eval", 1, lambda d: d.update(model=IMG, data=f"/data/{EVIL}.jsonl")),
        "staged.json": ("staged", 1, lambda d: d["steps"][2].update(gate=EVIL, failures=[IMG])),
    }
    for name, (kind, version, change) in edits.items():
        data = read_artifact(run / name, kind, version)
        change(data)
        write_artifact(run / name, kind, version, data)
    frontier = json.loads((run / "frontier.json").read_text())
    for row in frontier["rows"].values():
        row["name"], row["family"] = f"{row['name']} {EVIL}", f"{row['family']} {IMG}"
    (run / "frontier.json").write_text(json.dumps(frontier))
    return run


def _hostile_search(data: dict) -> None:
    data.update(space=IMG, notes=[EVIL, QUOTE], budget={**data["budget"], "specs": [f"memory={EVIL}"]})
    data["holdout"]["data"] = f"/data/{QUOTE}.txt"
    for trial in data["trials"]:
        if trial["source"] == "tpe":
            trial["source"] = f"tpe {EVIL}"
    data["baselines"] = {f"{name} {IMG}": value for name, value in data["baselines"].items()}


def _figure_strings(body: str) -> list[str]:
    """Every string in the plotly figure a report script draws."""
    match = re.match(r"\(function \(\) \{ var f = (\{.*?\}); window\.plotlyReady", body, re.S)
    assert match, body[:200]
    found: list[str] = []

    def walk(value):
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(key)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(json.loads(match.group(1)))
    return found


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    monkeypatch = pytest.MonkeyPatch()
    try:
        run = _hostile_run(tmp_path_factory.mktemp("hostile"), monkeypatch)
    finally:
        monkeypatch.undo()
    assert main(["report", str(run)]) == 0
    return (run / "report.html").read_text()


def test_every_artifact_was_read_and_drawn(page):
    assert "could not be read" not in page and 'class="missing"' not in page
    assert page.count('<div class="plot"') == 9  # every figure, the Optuna study's included


def test_no_element_or_attribute_was_injected(page):
    parsed = _Page()
    parsed.feed(page)
    parsed.close()
    assert parsed.comments == []
    assert {tag for tag, _ in parsed.tags} <= OURS, {tag for tag, _ in parsed.tags} - OURS
    for tag, attrs in parsed.tags:
        assert set(attrs) <= {"lang", "charset", "name", "content", "type", "id", "class", "href"}, (tag, attrs)
        assert not any(value and "javascript:" in value.lower() for value in attrs.values()), (tag, attrs)
        if tag == "a":
            assert attrs["href"].startswith("#") and re.fullmatch(r"#[a-z-]+", attrs["href"]), attrs
    figures = page.count('<div class="plot"')
    assert len(parsed.scripts) == 2 + figures == page.count("</script>")  # packed plotly.js, loader, figures
    assert parsed.scripts[0][0] == {"type": "application/octet-stream", "id": "plotly-js-gzip"}
    assert re.fullmatch(r"\s*[A-Za-z0-9+/=]+\s*", parsed.scripts[0][1])
    for attrs, body in parsed.scripts[2:]:
        assert attrs == {} and "</" not in body and "<" not in body, body[:200]


def test_hostile_strings_show_as_text(page):
    parsed = _Page()
    parsed.feed(page)
    text = "".join(parsed.text)
    for needle in (EVIL, IMG, "model.layers.1." + IMG, f"/data/{IMG}.txt", f"tpe {EVIL}"):
        assert needle in text, f"{needle!r} is not shown on the page"
    assert EVIL not in page and "<img" not in page and "onmouseover=\"alert" not in page


def test_figure_text_holds_no_markup_from_the_run(page):
    parsed = _Page()
    parsed.feed(page)
    for _, body in parsed.scripts[2:]:
        for string in _figure_strings(body):
            left = PLOTLY_MARKUP.sub("", string)
            assert "<" not in left and ">" not in left, f"unescaped markup in a figure: {string[:200]!r}"
