"""A seeded, reproducible fictional encyclopedia: the local web site that the browsing tools visit.

`generate_site(folder, seed)` writes about 50 interlinked HTML pages (cities, rivers, mountains, people,
inventions; each with an infobox table of facts and prose that states them), an index with a search
form, and list pages with tables. The same seed gives byte-identical files. The ground truth (every
page's facts) is returned and written to `site.json`, which the server does not serve.

Everything here is fiction generated from a seed; any resemblance to real places is chance.

>>> import tempfile
>>> site = generate_site(tempfile.mkdtemp(), seed=3)
>>> len(site.pages) >= 50, site.pages[0].path
(True, 'index.html')
"""

from __future__ import annotations

import html
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

KINDS = ("city", "river", "mountain", "person", "invention")
_COUNTS = {"city": 12, "river": 8, "mountain": 8, "person": 12, "invention": 8}
_SYLLABLES = ("var", "nol", "tek", "ari", "bel", "dun", "esk", "fal", "gor", "hal", "ith", "jor", "kel",
              "lum", "mar", "nev", "ost", "pra", "quin", "ros", "sil", "tor", "ulm", "vey", "wen", "yra", "zan")
_REGIONS = ("Northmark", "Eastvale", "Southreach", "Westholm", "Midlands")
_FIELDS = ("astronomy", "metallurgy", "cartography", "medicine", "hydraulics", "music", "printing")


@dataclass(frozen=True)
class Page:
    """One generated page: where it lives, its title, its kind and the facts it states."""

    path: str
    title: str
    kind: str
    facts: dict[str, str | int] = field(default_factory=dict)


@dataclass(frozen=True)
class Site:
    """The generated site: its seed, folder and pages (ground truth)."""

    seed: int
    folder: str
    pages: list[Page]

    def page(self, title: str) -> Page:
        for p in self.pages:
            if p.title == title:
                return p
        raise KeyError(f"no page titled {title!r} in the site of seed {self.seed}")

    def of_kind(self, kind: str) -> list[Page]:
        return [p for p in self.pages if p.kind == kind]


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def _slug(title: str) -> str:
    return title.lower().replace(" ", "_")


def _facts(rng: random.Random, pages: dict[str, list[Page]]) -> dict[str, dict[str, str | int]]:
    """Facts per title; references to other pages are by title."""
    cities, rivers, people = pages["city"], pages["river"], pages["person"]
    facts: dict[str, dict[str, str | int]] = {}
    for p in cities:
        facts[p.title] = {"region": rng.choice(_REGIONS), "population": rng.randrange(2_000, 900_000, 10),
                          "founded": rng.randint(600, 1850), "river": rng.choice(rivers).title}
    for p in rivers:
        facts[p.title] = {"length_km": rng.randint(40, 2400), "source": rng.choice(pages["mountain"]).title,
                          "mouth_city": rng.choice(cities).title}
    for p in pages["mountain"]:
        facts[p.title] = {"height_m": rng.randint(800, 6900), "region": rng.choice(_REGIONS),
                          "first_ascent": rng.randint(1700, 1990)}
    for p in people:
        born = rng.randint(1500, 1900)
        facts[p.title] = {"born": born, "died": born + rng.randint(30, 95), "birthplace": rng.choice(cities).title,
                          "field": rng.choice(_FIELDS)}
    for p in pages["invention"]:
        inventor = rng.choice(people)
        facts[p.title] = {"year": int(facts[inventor.title]["born"]) + rng.randint(20, 30),
                          "inventor": inventor.title, "field": facts[inventor.title]["field"]}
    return facts


_SENTENCES = {
    "city": ["{t} is a city in the region of {region}.", "{t} was founded in {founded}.",
             "The population of {t} is {population}.", "{t} lies on the river {river}."],
    "river": ["The {t} is a river {length_km} km long.", "The {t} rises on the slopes of {source}.",
              "The {t} reaches the sea at {mouth_city}."],
    "mountain": ["{t} is a mountain in {region}.", "{t} is {height_m} metres high.",
                 "{t} was first climbed in {first_ascent}."],
    "person": ["{t} was a scholar of {field}.", "{t} was born in {born} in {birthplace}.",
               "{t} died in {died}."],
    "invention": ["The {t} is a device used in {field}.", "The {t} was invented in {year} by {inventor}."],
}
_FILLER = ["Travellers' accounts describe it at length.", "Its history is recorded in several chronicles.",
           "Local archives hold further records.", "It appears on most maps of the period.",
           "Scholars still debate parts of its early history."]


def _render(page: Page, by_title: dict[str, Page], rng: random.Random, related: list[Page]) -> str:
    def ref(value: str | int) -> str:
        target = by_title.get(str(value))
        return f'<a href="{target.path.rpartition("/")[2]}">{html.escape(target.title)}</a>' if target else str(value)

    sentences = [s.format(t=html.escape(page.title), **{k: ref(v) for k, v in page.facts.items()})
                 for s in _SENTENCES[page.kind]]
    rng.shuffle(sentences)
    sentences.insert(rng.randint(1, len(sentences)), rng.choice(_FILLER))
    rows = "".join(f"<tr><th>{html.escape(k.replace('_', ' '))}</th><td>{ref(v)}</td></tr>"
                   for k, v in page.facts.items())
    see_also = "".join(f'<li><a href="{p.path.rpartition("/")[2]}">{html.escape(p.title)}</a></li>' for p in related)
    return (
        f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(page.title)}"
        f" - Fabula Encyclopedia</title></head>\n<body>\n<nav><a href=\"../index.html\">Main page</a> | "
        f"<a href=\"../lists/{page.kind}.html\">All {page.kind} articles</a></nav>\n"
        f"<h1>{html.escape(page.title)}</h1>\n<p class=\"kind\">A {page.kind} of the Fabula world.</p>\n"
        f"<table class=\"infobox\">{rows}</table>\n<p>{' '.join(sentences)}</p>\n"
        f"<h2>See also</h2>\n<ul>{see_also}</ul>\n</body></html>\n"
    )


def _list_page(kind: str, pages: list[Page]) -> str:
    keys = list(pages[0].facts)
    head = "".join(f"<th>{html.escape(k.replace('_', ' '))}</th>" for k in keys)
    rows = "".join(
        f'<tr><td><a href="../wiki/{p.path.rpartition("/")[2]}">{html.escape(p.title)}</a></td>'
        + "".join(f"<td>{html.escape(str(p.facts[k]))}</td>" for k in keys) + "</tr>"
        for p in pages
    )
    return (
        f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>List of {kind} articles"
        f" - Fabula Encyclopedia</title></head>\n<body>\n<nav><a href=\"../index.html\">Main page</a></nav>\n"
        f"<h1>List of {kind} articles</h1>\n<table class=\"list\"><tr><th>name</th>{head}</tr>{rows}</table>\n"
        "</body></html>\n"
    )


def _index_page(seed: int, pages: list[Page]) -> str:
    sections = "".join(
        f"<h2><a href=\"lists/{kind}.html\">{kind.capitalize()} articles</a></h2><ul>"
        + "".join(f'<li><a href="{p.path}">{html.escape(p.title)}</a></li>' for p in pages if p.kind == kind)
        + "</ul>\n"
        for kind in KINDS
    )
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Fabula Encyclopedia - Main page"
        f"</title></head>\n<body>\n<h1>Fabula Encyclopedia</h1>\n<p>A fictional encyclopedia (edition {seed}).</p>\n"
        "<form action=\"search\" method=\"get\"><label>Search <input name=\"q\" type=\"text\"></label>"
        "<button type=\"submit\">Go</button></form>\n" + sections + "</body></html>\n"
    )


def generate_site(folder: str | Path, seed: int = 0) -> Site:
    """Write the site of `seed` into `folder` (created if missing) and return its ground truth."""
    rng = random.Random(seed)
    root = Path(folder)
    taken: set[str] = set()
    by_kind: dict[str, list[Page]] = {}
    for kind in KINDS:
        by_kind[kind] = [Page(f"wiki/{_slug(t)}.html", t, kind) for t in _names(rng, _COUNTS[kind], taken)]
    facts = _facts(rng, by_kind)
    entities = [Page(p.path, p.title, p.kind, facts[p.title]) for kind in KINDS for p in by_kind[kind]]
    by_title = {p.title: p for p in entities}
    index = Page("index.html", "Fabula Encyclopedia - Main page", "index")
    lists = [Page(f"lists/{kind}.html", f"List of {kind} articles", "list") for kind in KINDS]
    (root / "wiki").mkdir(parents=True, exist_ok=True)
    (root / "lists").mkdir(parents=True, exist_ok=True)
    for page in entities:
        related = rng.sample([p for p in entities if p is not page], 3)
        (root / page.path).write_text(_render(page, by_title, rng, related), encoding="utf-8")
    for kind, page in zip(KINDS, lists, strict=True):
        (root / page.path).write_text(_list_page(kind, [p for p in entities if p.kind == kind]), encoding="utf-8")
    (root / index.path).write_text(_index_page(seed, entities), encoding="utf-8")
    site = Site(seed=seed, folder=str(root), pages=[index, *lists, *entities])
    manifest = {"seed": seed, "pages": [asdict(p) for p in site.pages]}
    (root / "site.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return site
