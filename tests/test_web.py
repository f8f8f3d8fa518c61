"""The web environment: seeded site, loopback server, BM25 search, and headless Chromium browser tools.

Browser tests are marked slow and share one Chromium for the module; they skip when /usr/bin/chromium
(Debian package `chromium`) or the `playwright` package is missing.
"""

from __future__ import annotations

import filecmp
import importlib.util
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cso_lib.errors import ToolError, URLRefusedError
from cso_lib.web.browser import CHROMIUM, TOOL_SPECS, is_loopback_url
from cso_lib.web.search import SEARCH_TOOL_SPEC, SearchIndex, search_tool
from cso_lib.web.server import SiteServer
from cso_lib.web.site import generate_site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return generate_site(tmp_path_factory.mktemp("site"), seed=7)


@pytest.fixture(scope="module")
def server(site):
    with SiteServer(site.folder) as srv:
        yield srv


def test_site_is_deterministic_for_a_seed(tmp_path, site):
    a = generate_site(tmp_path / "a", seed=7)
    b = generate_site(tmp_path / "b", seed=8)
    assert a.pages == site.pages and a.pages != b.pages
    files = sorted(p.relative_to(a.folder).as_posix() for p in Path(a.folder).rglob("*") if p.is_file())
    assert len(files) >= 50 and "site.json" in files
    match, mismatch, errors = filecmp.cmpfiles(a.folder, site.folder, files, shallow=False)
    assert not mismatch and not errors and len(match) == len(files)


def test_site_pages_are_interlinked_and_state_their_facts(site):
    assert len(site.pages) >= 50
    city = site.of_kind("city")[0]
    markup = (Path(site.folder) / city.path).read_text()
    assert f"was founded in {city.facts['founded']}." in markup and "<table" in markup
    river = site.page(str(city.facts["river"]))
    assert f'href="{Path(river.path).name}"' in markup
    index = (Path(site.folder) / "index.html").read_text()
    assert "<form" in index and all(p.path in index for p in site.pages if p.kind in ("city", "person"))


def test_server_serves_pages_on_loopback(server, site):
    assert server.url.startswith("http://127.0.0.1:")
    city = site.of_kind("city")[0]
    with urllib.request.urlopen(server.url + city.path, timeout=5) as r:
        assert r.status == 200 and city.title in r.read().decode()
    for hidden in ("site.json", "wiki/"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url + hidden, timeout=5)
        assert e.value.code == 404
    with urllib.request.urlopen(server.url + "search?q=" + city.title, timeout=5) as r:
        assert server.url + city.path in r.read().decode()


def test_server_stops(site):
    with SiteServer(site.folder) as srv:
        url = srv.url
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "index.html", timeout=2)


def test_search_ranks_the_page_holding_a_fact_first(site):
    index = SearchIndex.from_folder(site.folder, base_url="http://127.0.0.1:1/")
    for page in site.of_kind("mountain")[:4] + site.of_kind("person")[:4]:
        key = "height_m" if page.kind == "mountain" else "born"
        hits = index.search(f"{page.title} {page.facts[key]}", k=3)
        assert hits[0].url == f"http://127.0.0.1:1/{page.path}", (page, hits)
        assert str(page.facts[key]) in hits[0].snippet and hits[0].title.startswith(page.title)
    assert index.search("zzzzqqq") == []


def test_search_tool_adapter(site):
    index = SearchIndex.from_folder(site.folder)
    inv = site.of_kind("invention")[0]
    text = search_tool(index, {"query": f"who invented the {inv.title}", "k": 2})
    assert text.startswith("Results for") and inv.path in text.splitlines()[2]
    assert SEARCH_TOOL_SPEC["function"]["name"] == "search"
    with pytest.raises(ToolError, match="query"):
        search_tool(index, {"q": "x"})


def test_loopback_check():
    assert is_loopback_url("http://127.0.0.1:8000/x") and is_loopback_url("http://localhost/")
    assert is_loopback_url("http://[::1]:80/") and is_loopback_url("http://127.1.2.3/")
    for url in ("https://example.com/", "http://10.0.0.1/", "file:///etc/passwd", "ftp://127.0.0.1/",
                "http://127.0.0.1.nip.io/", "javascript:alert(1)", "chrome://version"):
        assert not is_loopback_url(url), url


# ------------------------------------------------------------------------------------------ browser

def needs_browser(fn):
    """Mark a test slow and skip it without Chromium or playwright."""
    fn = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)")(fn)
    fn = pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright is not installed")(fn)
    return pytest.mark.slow(fn)


@pytest.fixture(scope="module")
def browser():
    from cso_lib.web.browser import BrowserTools

    with BrowserTools() as b:
        yield b


@needs_browser
def test_browser_opens_follows_finds_and_goes_back(browser, server, site):
    city = site.of_kind("city")[0]
    river = site.page(str(city.facts["river"]))
    obs = browser.open_url(server.url + city.path)
    assert obs.startswith(f"URL: {server.url}{city.path}") and f"Title: {city.title}" in obs
    assert f"{city.title} was founded in {city.facts['founded']}." in obs and "Links:" in obs

    obs = browser.click(river.title)
    assert browser.page.url == server.url + river.path and f"Title: {river.title}" in obs

    found = browser.find_in_page("km long")
    assert f"{river.facts['length_km']} km long" in found and "line(s)" in found
    assert "was not found" in browser.find_in_page("no such phrase anywhere")

    obs = browser.back()
    assert browser.page.url == server.url + city.path and f"Title: {city.title}" in obs
    assert browser.get_text() == obs


@needs_browser
def test_browser_search_form_and_selector_click(browser, server, site):
    person = site.of_kind("person")[0]
    browser.open_url(server.url + "index.html")
    browser.page.fill("input[name=q]", f"{person.title} born")
    obs = browser.click("button[type=submit]")
    assert "Search results for" in obs and person.title in obs
    obs = browser.click(person.title + " - Fabula Encyclopedia")
    assert browser.page.url == server.url + person.path and str(person.facts["born"]) in obs


@needs_browser
def test_browser_refuses_non_loopback_urls(browser, server):
    browser.open_url(server.url + "index.html")
    for url in ("https://example.com/", "http://10.1.2.3/", "file:///etc/passwd", "chrome://settings"):
        with pytest.raises(URLRefusedError, match="loopback"):
            browser.open_url(url)
        assert browser.page.url == server.url + "index.html"
    assert browser.call("open_url", {"url": "https://example.com/"}).startswith("[error] open_url: only loopback")
    # A page cannot reach outside hosts either: such requests are aborted, loopback ones go through.
    fetch = "u => fetch(u, {mode: 'no-cors'}).then(() => 'sent', () => 'aborted')"
    assert browser.page.evaluate(fetch, "http://10.9.9.9/x") == "aborted"
    assert browser.page.evaluate(fetch, server.url + "index.html") == "sent"
    browser.page.set_content('<a href="https://example.com/x">out</a>')
    with pytest.raises(URLRefusedError, match="outside the local site"):
        browser.click("out")


@needs_browser
def test_browser_tool_calls_and_specs(browser, server):
    names = [t["function"]["name"] for t in TOOL_SPECS]
    assert names == ["open_url", "click", "find_in_page", "get_text", "back"]
    assert browser.call("open_url", {"url": server.url + "lists/city.html"}).startswith("URL: ")
    assert "List of city articles" in browser.call("get_text", {})
    assert browser.call("click", {"target": "no such link"}).startswith("[error] click: no link")
    assert browser.call("scroll", {}).startswith("[error] unknown tool 'scroll'")
    assert browser.call("find_in_page", {"txt": "x"}).startswith("[error] find_in_page: bad arguments")
