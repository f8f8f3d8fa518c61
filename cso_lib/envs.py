"""Environments a branch rollout executes actions in: the simulation world, a code sandbox, a web browser.

An environment runs an action's tool calls and returns the observation messages. It also declares, per
branch point, whether the state s_t can be rebuilt from the log (`replayable(task_id, state)`): a branch
whose environment state a replay cannot rebuild is skipped with that reason, never run wrongly.

Environments (`environment_for(env, ...)`, chosen per trajectory by its `env` column):

- `sim`: the simulation world's look-up tools. Stateless: every state replays exactly.
- `code`: code actions in the sandbox (cso_lib.sandbox), one fresh interpreter per action, in either format:
  an OpenAI tool call `python(code=...)`, or a code action (```python fenced blocks in the message text, the
  observation coming back as a user message). Nothing persists between actions, so every state replays.
- `code-session`: the same tools, for agents logged with a PERSISTENT interpreter (variables and files kept
  between actions). The sandbox cannot rebuild that interpreter from the log, so a branch point after any
  executed code is declared unreplayable; branch points before the first code action replay exactly.
- `web`: browser tools (open_url, click, find_in_page, get_text, back; Playwright driving /usr/bin/chromium,
  headless, loopback only) and the local `search` tool, against the seeded local site (cso_lib.web) served on
  127.0.0.1. Each branch gets its own Chromium; its page and history are rebuilt by replaying the browser
  calls of s_t (the site is static and seeded, so replaying navigation rebuilds it exactly). A state whose
  earlier calls this environment cannot replay (a tool it does not have) is declared unreplayable. URLs of the
  site logged under another loopback port are mapped to this worker's server.

Each environment's `execute(task_id, state, action, key)` is called with the branch key; `release(key)` frees
what a finished branch held. Tool calls of different branches run concurrently (cso_lib.rollout).
"""

from __future__ import annotations

import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from cso_lib.messages import Message, tool_calls
from cso_lib.sim.world import SimWorld


class Environment(Protocol):
    name: str

    def replayable(self, task_id: str, state: list[Message]) -> str | None:
        """None if a branch at `state` of this task can be rebuilt from its log; otherwise the reason it cannot."""

    def execute(self, task_id: str, state: list[Message], action: Message, key: str = "") -> list[Message]: ...

    def release(self, key: str) -> None: ...


class SimEnvironment:
    """The simulation world's tools. Stateless look-ups: every state replays exactly."""

    name = "sim"

    def __init__(self, world: SimWorld) -> None:
        self.world = world

    def replayable(self, task_id: str, state: list[Message] | None = None) -> str | None:
        try:
            self.world.task(task_id)
        except (KeyError, ValueError) as e:
            return f"task {task_id!r} is not in this simulation world: {e}"
        if not task_id.startswith(f"sim-{self.world.seed}-"):
            return f"task {task_id!r} belongs to another simulation seed than {self.world.seed}"
        return None

    def execute(self, task_id: str, state: list[Message], action: Message, key: str = "") -> list[Message]:
        return self.world.execute(action)

    def release(self, key: str) -> None:
        pass


# ---- code ------------------------------------------------------------------------------------------------
def _runs_code(action: Message) -> bool:
    from cso_lib.sandbox import extract_code_actions

    if action.get("tool_calls"):
        return any(name == "python" for name, _, _ in tool_calls(action))
    return bool(extract_code_actions(action.get("content") or ""))


class CodeEnvironment:
    """Python code actions in the sandbox (see the module docstring); `persistent` = the agent was logged with
    a persistent interpreter."""

    def __init__(self, limits=None, persistent: bool = False) -> None:
        from cso_lib.sandbox import PYTHON_TOOL_SPEC, SandboxLimits

        self.limits = limits or SandboxLimits()
        self.persistent = persistent
        self.name = "code-session" if persistent else "code"
        self.tools = [PYTHON_TOOL_SPEC]

    def replayable(self, task_id: str, state: list[Message]) -> str | None:
        if not self.persistent:
            return None
        ran = sum(1 for m in state if m.get("role") == "assistant" and _runs_code(m))
        if ran:
            return (f"env 'code-session': the persistent interpreter state built by {ran} earlier code action(s) "
                    "cannot be rebuilt from the log (the sandbox runs each action in a fresh interpreter)")
        return None

    def execute(self, task_id: str, state: list[Message], action: Message, key: str = "") -> list[Message]:
        from cso_lib.sandbox import execute_action

        return execute_action(action, self.limits)

    def release(self, key: str) -> None:
        pass


# ---- web -------------------------------------------------------------------------------------------------
_LOOPBACK_ORIGIN = re.compile(r"^https?://(?:127\.\d+\.\d+\.\d+|localhost|\[::1\])(?::\d+)?/")


class _Site:
    """The seeded site, its search index and its server on 127.0.0.1: one per seed and Python worker."""

    _cache: dict[int, _Site] = {}
    _lock = threading.Lock()

    def __init__(self, seed: int) -> None:
        from cso_lib.web.search import SearchIndex
        from cso_lib.web.server import SiteServer
        from cso_lib.web.site import generate_site

        self.site = generate_site(tempfile.mkdtemp(prefix=f"cso-site-{seed}-"), seed=seed)
        self.server = SiteServer(self.site.folder).start()
        self.index = SearchIndex.from_folder(self.site.folder, base_url=self.server.url)

    @classmethod
    def get(cls, seed: int) -> _Site:
        with cls._lock:
            if seed not in cls._cache:
                cls._cache[seed] = _Site(seed)
            return cls._cache[seed]


class _BrowserSession:
    """One branch's Chromium, driven from its own thread (Playwright's sync API is bound to one thread)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cso-browser")
        self.browser = None

    def run(self, fn, *args):
        return self.pool.submit(fn, *args).result()

    def close(self) -> None:
        if self.browser is not None:
            self.run(self.browser.close)
        self.pool.shutdown(wait=True)


class WebEnvironment:
    """Browser and search tools against the seeded local site (see the module docstring)."""

    name = "web"
    BROWSER_TOOLS = ("open_url", "click", "find_in_page", "get_text", "back")

    def __init__(self, site_seed: int = 0) -> None:
        from cso_lib.web.browser import TOOL_SPECS
        from cso_lib.web.search import SEARCH_TOOL_SPEC

        self.site_seed = site_seed
        self.tools = [*TOOL_SPECS, SEARCH_TOOL_SPEC]
        self.sessions: dict[str, _BrowserSession] = {}

    @property
    def site(self) -> _Site:
        return _Site.get(self.site_seed)

    def replayable(self, task_id: str, state: list[Message]) -> str | None:
        known = {*self.BROWSER_TOOLS, "search"}
        for i, m in enumerate(state):
            if m.get("role") != "assistant":
                continue
            for name, args, _ in tool_calls(m):
                if name not in known:
                    return (f"env 'web': message {i} of the state calls tool {name!r}, which this environment "
                            f"cannot replay (it has {sorted(known)})")
                if args is None:
                    return f"env 'web': message {i} of the state calls {name!r} with arguments that are not JSON"
        return None

    def _local(self, args: dict[str, Any]) -> dict[str, Any]:
        url = args.get("url")
        if isinstance(url, str):
            if _LOOPBACK_ORIGIN.match(url):
                url = _LOOPBACK_ORIGIN.sub(self.site.server.url, url)
            elif not re.match(r"^[a-z]+:", url):  # a path of the site
                url = self.site.server.url + url.lstrip("/")
            args = {**args, "url": url}
        return args

    def _call(self, browser, name: str | None, args: dict[str, Any] | None) -> str:
        from cso_lib.errors import ToolError
        from cso_lib.web.search import search_tool

        if args is None:
            return f"[error] {name}: arguments are not valid JSON"
        if name == "search":
            try:
                return search_tool(self.site.index, args)
            except ToolError as e:
                return f"[error] {e}"
        return browser.call(name or "", self._local(args))

    def _session(self, key: str, state: list[Message]) -> _BrowserSession:
        session = self.sessions.get(key)
        if session is None:
            from cso_lib.web.browser import BrowserTools

            session = self.sessions[key] = _BrowserSession()
            session.browser = session.run(BrowserTools)
            for m in state:  # rebuild the page and its history from the state's browser calls
                if m.get("role") == "assistant":
                    for name, args, _ in tool_calls(m):
                        if name in self.BROWSER_TOOLS and name not in ("get_text", "find_in_page"):
                            session.run(self._call, session.browser, name, args)
        return session

    def execute(self, task_id: str, state: list[Message], action: Message, key: str = "") -> list[Message]:
        calls = tool_calls(action)
        if not calls:
            return []
        prior = state[:-1] if state and state[-1] is action else state  # s_t plus what the branch did before
        session = self._session(key, prior)
        return [{"role": "tool", "tool_call_id": cid, "content": session.run(self._call, session.browser, name, args)}
                for name, args, cid in calls]

    def release(self, key: str) -> None:
        session = self.sessions.pop(key, None)
        if session is not None:
            session.close()


def environment_for(env: str, world: SimWorld | None, web_site_seed: int = 0, code_limits=None) -> Environment | None:
    """The environment a trajectory's `env` names, or None when this build has none for it."""
    if env == "sim" and world is not None:
        return SimEnvironment(world)
    if env in ("code", "code-session"):
        return CodeEnvironment(code_limits, persistent=env == "code-session")
    if env == "web":
        return WebEnvironment(web_site_seed)
    return None
