"""Browser tools for agents: Playwright driving Debian's Chromium, headless, loopback URLs only.

`BrowserTools` holds one Chromium (a fresh, empty user data dir) and one page. Its tools return
observation text: `open_url(url)`, `click(target)` (a link's text, else a CSS selector), `find_in_page(text)`,
`get_text()` and `back()`. `call(name, arguments)` executes an OpenAI tool call; `TOOL_SPECS` are the
tools' OpenAI specs. Navigation and every request the page makes are limited to loopback hosts
(127.0.0.0/8, ::1, localhost): others are refused with `URLRefusedError` (for `open_url`) or aborted.

Playwright's sync API is bound to the thread that started it: use one `BrowserTools` per thread.
Chromium is never downloaded (`playwright install` is not used); it must be at `/usr/bin/chromium`
(Debian package `chromium`).

    with SiteServer(folder) as srv, BrowserTools() as b:
        print(b.open_url(srv.url + "index.html"))
        print(b.click("Rivers articles"))
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import tempfile
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from cso_lib.errors import ToolError, URLRefusedError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]


def is_loopback_url(url: str) -> bool:
    """True for http(s) URLs whose host is a loopback address or `localhost`; also about:blank.

    >>> [is_loopback_url(u) for u in ("http://127.0.0.1:8000/a", "https://example.com/", "file:///etc/passwd")]
    [True, False, False]
    """
    if url == "about:blank":
        return True
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def _tool(name: str, description: str, params: dict[str, str] | None = None) -> dict[str, Any]:
    props = {k: {"type": "string", "description": v} for k, v in (params or {}).items()}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": list(props)}}}


TOOL_SPECS: list[dict[str, Any]] = [
    _tool("open_url", "Open a URL of the local encyclopedia and show the page.", {"url": "The http URL to open."}),
    _tool("click", "Follow a link by its text (or click the element matching a CSS selector) and show the page.",
          {"target": "The link text, or a CSS selector."}),
    _tool("find_in_page", "Find a text in the current page; shows the matching lines.",
          {"text": "The text to find (case-insensitive)."}),
    _tool("get_text", "Show the current page's text and links."),
    _tool("back", "Go back to the previous page."),
]


class BrowserTools:
    """One headless Chromium page and the tools that drive it. Use as a context manager or call close()."""

    def __init__(self, executable_path: str = CHROMIUM, max_chars: int = 6000, timeout_ms: int = 10_000) -> None:
        from playwright.sync_api import sync_playwright

        if not shutil.which(executable_path):
            raise ToolError(f"browser: Chromium not found at {executable_path!r} (apt-get install chromium)")
        self.max_chars = max_chars
        self._user_dir = tempfile.mkdtemp(prefix="cso-chromium-")
        self._pw = sync_playwright().start()
        try:
            self._ctx = self._pw.chromium.launch_persistent_context(
                self._user_dir, executable_path=executable_path, headless=True, args=CHROMIUM_ARGS,
                service_workers="block", accept_downloads=False,
            )
            self._ctx.set_default_timeout(timeout_ms)
            self._ctx.route("**/*", self._route)
            self.page = self._ctx.pages[0] if self._ctx.pages else self._ctx.new_page()
        except BaseException:
            self._pw.stop()
            shutil.rmtree(self._user_dir, ignore_errors=True)
            raise

    @staticmethod
    def _route(route: Any) -> None:
        if is_loopback_url(route.request.url) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            route.abort("blockedbyclient")

    # ---------------------------------------------------------------------------------------- tools

    def open_url(self, url: str) -> str:
        if not isinstance(url, str) or not is_loopback_url(url):
            raise URLRefusedError(f"open_url: only loopback http(s) URLs of the local site are allowed, got {url!r}")
        from playwright.sync_api import Error as PlaywrightError

        try:
            response = self.page.goto(url, wait_until="domcontentloaded")
        except PlaywrightError as e:
            raise ToolError(f"open_url: cannot open {url!r}: {str(e).splitlines()[0]}") from e
        status = response.status if response is not None else None
        if status is not None and status >= 400:
            return f"[HTTP {status}] {url}\n" + self._observe()
        return self._observe()

    def click(self, target: str) -> str:
        if not isinstance(target, str) or not target.strip():
            raise ToolError(f"click: expected a link text or CSS selector, got {target!r}")
        from playwright.sync_api import Error as PlaywrightError

        links = self.page.get_by_role("link", name=target, exact=True)
        if links.count() == 0:
            links = self.page.get_by_role("link", name=target)
        if links.count() == 0:
            try:
                links = self.page.locator(target)
                found = links.count()
            except PlaywrightError:
                found = 0
            if found == 0:
                raise ToolError(f"click: no link or element matches {target!r} on {self.page.url}")
        href = links.first.get_attribute("href") if links.first.evaluate("e => e.tagName") == "A" else None
        if href is not None:
            absolute = self.page.evaluate("h => new URL(h, document.baseURI).href", href)
            if not is_loopback_url(absolute):
                raise URLRefusedError(f"click: the link {target!r} leads to {absolute!r}, outside the local site")
        try:
            links.first.click()
            self.page.wait_for_load_state("domcontentloaded")
        except PlaywrightError as e:
            raise ToolError(f"click: cannot click {target!r}: {str(e).splitlines()[0]}") from e
        return self._observe()

    def find_in_page(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise ToolError(f"find_in_page: expected a non-empty text, got {text!r}")
        needle = text.lower()
        lines = [line for line in self._text().splitlines() if needle in line.lower()]
        if not lines:
            return f"{text!r} was not found on {self.page.url}"
        shown = "\n".join(f"- {line}" for line in lines[:20])
        more = f"\n(and {len(lines) - 20} more lines)" if len(lines) > 20 else ""
        return f"{len(lines)} line(s) on {self.page.url} contain {text!r}:\n{shown}{more}"

    def get_text(self) -> str:
        return self._observe()

    def back(self) -> str:
        response = self.page.go_back(wait_until="domcontentloaded")
        if response is None and self.page.url in ("about:blank", ""):
            return "There is no previous page.\n" + self._observe()
        return self._observe()

    def call(self, name: str, arguments: dict[str, Any] | None = None) -> str:
        """Execute one OpenAI tool call; tool errors become the observation text."""
        tools = {"open_url": self.open_url, "click": self.click, "find_in_page": self.find_in_page,
                 "get_text": self.get_text, "back": self.back}
        fn = tools.get(name)
        try:
            if fn is None:
                raise ToolError(f"unknown tool {name!r}; available: {', '.join(tools)}")
            return fn(**(arguments or {}))
        except TypeError as e:
            return f"[error] {name}: bad arguments {arguments!r}: {e}"
        except ToolError as e:
            return f"[error] {e}"

    # ------------------------------------------------------------------------------------- helpers

    def _text(self) -> str:
        text = self.page.inner_text("body") if self.page.url != "about:blank" else ""
        return re.sub(r"\n{3,}", "\n\n", text).strip()

    def _observe(self) -> str:
        text = self._text()
        if len(text) > self.max_chars:
            text = text[: self.max_chars] + f"\n[... {len(text) - self.max_chars} more characters]"
        links = self.page.eval_on_selector_all("a[href]", "els => els.map(e => e.innerText.trim()).filter(t => t)")
        seen = list(dict.fromkeys(links))
        return (f"URL: {self.page.url}\nTitle: {self.page.title()}\n\n{text}\n\n"
                f"Links: {', '.join(seen[:60])}{' ...' if len(seen) > 60 else ''}")

    def close(self) -> None:
        try:
            self._ctx.close()
        finally:
            self._pw.stop()
            shutil.rmtree(self._user_dir, ignore_errors=True)

    def __enter__(self) -> BrowserTools:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
