"""A tiny DOM for tests, on the standard library's html.parser.

Reports are asserted on their structure (this value sits in that row's value
cell), not on substrings, so a test cannot pass because a string happens to
appear elsewhere on the page. Text is unescaped by the parser, so comparing it
with the original record text also proves the escaping round-trips.
"""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser

import attrs

VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"})


@attrs.define(eq=False)
class Element:
    tag: str
    attrs: dict[str, str | None]
    children: list[Element | str] = attrs.field(factory=list)
    parent: Element | None = attrs.field(default=None, repr=False)

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    @property
    def text(self) -> str:
        """All text inside, concatenated as the parser delivered it (no whitespace folding)."""
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    @property
    def clean_text(self) -> str:
        """Text with runs of whitespace folded to one space, as a reader sees it."""
        return " ".join(self.text.split())

    def iter(self) -> Iterator[Element]:
        yield self
        for c in self.children:
            if isinstance(c, Element):
                yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attr: str) -> list[Element]:
        return [
            e
            for e in self.iter()
            if e is not self
            and (tag is None or e.tag == tag)
            and (cls is None or cls in e.classes)
            and all(e.attrs.get(k) == v for k, v in attr.items())
        ]

    def find(self, tag: str | None = None, cls: str | None = None, **attr: str) -> Element:
        found = self.find_all(tag, cls, **attr)
        if not found:
            raise AssertionError(f"no <{tag or '*'} class={cls!r} {attr}> under <{self.tag}>")
        return found[0]

    def ancestor(self, tag: str) -> Element:
        e = self.parent
        while e is not None and e.tag != tag:
            e = e.parent
        if e is None:
            raise AssertionError(f"<{self.tag}> has no <{tag}> ancestor")
        return e


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]
        self.unbalanced: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = Element(tag, dict(attrs), parent=self.stack[-1])
        self.stack[-1].children.append(el)
        if tag not in VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = Element(tag, dict(attrs), parent=self.stack[-1])
        self.stack[-1].children.append(el)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if self.stack[-1].tag != tag:
            self.unbalanced.append(f"</{tag}> closes <{self.stack[-1].tag}>")
            for i in range(len(self.stack) - 1, 0, -1):
                if self.stack[i].tag == tag:
                    del self.stack[i:]
                    return
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Element:
    """Parse ``html``; raise if a tag is closed out of order or left open (our pages are well formed)."""
    b = _Builder()
    b.feed(html)
    b.close()
    if b.unbalanced or len(b.stack) != 1:
        open_tags = [e.tag for e in b.stack[1:]]
        raise AssertionError(f"malformed HTML: {b.unbalanced[:5]} open={open_tags}")
    return b.root
