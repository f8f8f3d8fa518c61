"""A local search tool over the generated site: BM25 ranking of its pages' text.

`SearchIndex.from_folder(folder, base_url)` parses every served HTML page (title and visible text),
tokenises it (lower case, letters and digits) and ranks pages for a query with Okapi BM25 (k1 = 1.5,
b = 0.75). Results carry the title, URL and a snippet around the best-matching sentence.

>>> idx = SearchIndex([Doc("a.html", "Alpha", "The river Alpha is long."), Doc("b.html", "Beta", "Beta city.")])
>>> [h.title for h in idx.search("long river")]
['Alpha']
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from cso_lib.errors import ToolError

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case runs of letters and digits: "Founded in 1342, Varnol!" -> founded, in, 1342, varnol."""
    return _TOKEN.findall(text.lower())


@dataclass(frozen=True)
class Doc:
    """One searchable page: its URL (or path), title and visible text."""

    url: str
    title: str
    text: str


@dataclass(frozen=True)
class SearchHit:
    title: str
    url: str
    snippet: str
    score: float


class _TextExtractor(HTMLParser):
    """Title and visible text of an HTML page (no scripts/styles), block elements as line breaks."""

    _BLOCKS = {"p", "div", "li", "tr", "h1", "h2", "h3", "h4", "table", "ul", "nav", "br", "form", "title"}

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.parts: list[str] = []
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in ("td", "th"):
            self.parts.append(" ")
        if tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip -= 1
        elif tag == "title":
            self._in_title = False
        if tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def html_to_doc(url: str, markup: str) -> Doc:
    parser = _TextExtractor()
    parser.feed(markup)
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in "".join(parser.parts).splitlines())
    return Doc(url=url, title=parser.title.strip(), text="\n".join(line for line in lines if line))


class SearchIndex:
    """BM25 over a fixed set of documents."""

    def __init__(self, docs: list[Doc], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs = docs
        self.k1, self.b = k1, b
        # The title counts twice: a page about X should beat pages that mention X.
        self._tf = [Counter(tokenize(d.title) * 2 + tokenize(d.text)) for d in docs]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg = sum(self._len) / max(len(docs), 1)
        df: Counter[str] = Counter()
        for tf in self._tf:
            df.update(tf.keys())
        n = len(docs)
        self._idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    @classmethod
    def from_folder(cls, folder: str | Path, base_url: str = "") -> SearchIndex:
        """Index every .html page under `folder`; URLs are `base_url` + the page's relative path."""
        root = Path(folder)
        docs = [
            html_to_doc(base_url.rstrip("/") + "/" + p.relative_to(root).as_posix() if base_url
                        else p.relative_to(root).as_posix(), p.read_text(encoding="utf-8"))
            for p in sorted(root.rglob("*.html"))
        ]
        return cls(docs)

    def scores(self, query: str) -> list[float]:
        terms = [t for t in tokenize(query) if t in self._idf]
        out = []
        for tf, length in zip(self._tf, self._len, strict=True):
            s = 0.0
            for t in terms:
                f = tf.get(t, 0)
                if f:
                    s += self._idf[t] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * length / self._avg))
            out.append(s)
        return out

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        """The top `k` pages with a positive score, best first (ties: by URL, for reproducibility)."""
        ranked = sorted(
            ((s, i) for i, s in enumerate(self.scores(query)) if s > 0),
            key=lambda si: (-si[0], self.docs[si[1]].url),
        )
        return [SearchHit(self.docs[i].title, self.docs[i].url, self._snippet(self.docs[i], query), round(s, 4))
                for s, i in ranked[:k]]

    def _snippet(self, doc: Doc, query: str, width: int = 200) -> str:
        terms = set(tokenize(query))
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n", doc.text) if s.strip()]
        # Most query terms first; among equals the longer (prose over table cells), up to the width.
        best = max(sentences, key=lambda s: (len(terms & set(tokenize(s))), min(len(s), width)), default="")
        return best if len(best) <= width else best[: width - 3] + "..."


def format_hits(query: str, hits: list[SearchHit]) -> str:
    """The observation text of a search."""
    if not hits:
        return f"No results for {query!r}."
    lines = [f"Results for {query!r}:"]
    for n, h in enumerate(hits, 1):
        lines.append(f"{n}. {h.title}\n   {h.url}\n   {h.snippet}")
    return "\n".join(lines)


SEARCH_TOOL_SPEC: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the local encyclopedia. Returns titles, URLs and snippets of the best pages.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "Keywords to search for."},
                "k": {"type": "integer", "description": "How many results (1-10, default 5)."},
            },
            "required": ["query"],
        },
    },
}


def search_tool(index: SearchIndex, arguments: dict[str, Any]) -> str:
    """Execute a `search(query, k)` tool call against `index`; the observation text."""
    query = arguments.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ToolError(f"search: expected a non-empty string 'query', got {query!r}")
    k = arguments.get("k", 5)
    if not isinstance(k, int) or not 1 <= k <= 10:
        raise ToolError(f"search: 'k' must be an integer from 1 to 10, got {k!r}")
    return format_hits(query, index.search(query, k))
