"""HTML checks shared by the analysis tests."""

from __future__ import annotations

from html.parser import HTMLParser


class _Checker(HTMLParser):
    """Counts token spans; records any tag closed out of order."""

    def __init__(self):
        super().__init__()
        self.stack, self.spans, self.errors = [], 0, []

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "img", "br"):
            self.stack.append(tag)
        self.spans += tag == "span" and ("class", "tok") in attrs

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def parse_html(path) -> _Checker:
    """Parse an HTML file, asserting balanced tags; its checker holds the span count."""
    checker = _Checker()
    checker.feed(path.read_text(encoding="utf-8"))
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    return checker
