"""A fault-injecting fake LLM server on 127.0.0.1, speaking the OpenAI and Anthropic wire formats (tests only).

    python tests/fakes/llm_server.py --port 0 --rpm 60 --window-s 2 --fault-rate 0.2 --seed 1 --log /tmp/llm.jsonl

prints `READY <port>` once it listens. In a test, `with FakeLLMServer(...) as srv:` runs it in a thread.

Endpoints: OpenAI `POST /v1/chat/completions` (also any `.../chat/completions`, e.g. Azure's deployment URL),
`POST /v1/files` (multipart, purpose=batch), `GET /v1/files/{id}/content`, `POST /v1/batches`,
`GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`; Anthropic `POST /v1/messages`,
`POST /v1/messages/batches`, `GET /v1/messages/batches/{id}`, `GET /v1/messages/batches/{id}/results`.

Answers are deterministic functions of the request:
- JSON wanted (response_format, a forced tool, or "JSON" in the system prompt): with `"correct"` in the system
  prompt (the answer judge) {"extracted_final_answer", "reasoning", "correct": "yes" when the CORRECT block's
  text, lower-cased with punctuation dropped, occurs in the RESPONSE block's, else "no"}; with `"category"` in the
  system prompt (the taxonomy judge) {"reasoning", "category": one of the five, from a hash}; with "score" in
  the system prompt {"reasoning", "score" in [0, 1] from a hash}; with "alternatives" {"alternatives": [k items]} in the
  expert schema (each a `search` tool call), k from "<k> alternatives" (default 3); else {"echo", "id"}.
- tools given and the last message is not a tool result: a call of the first tool, {"query": <hash>}.
- else text "echo: <last text> [<hash>]".
- usage: chars / 4; with a cache key (OpenAI `prompt_cache_key`, Anthropic `cache_control`) the prefix
  (everything before the last message) is reported cached when this server saw it before (Anthropic: cache
  creation the first time).
- model "status-NNN": always HTTP NNN (e.g. status-400 to check a refusal is not retried).
- a structured-output or tool schema that is not a JSON schema: HTTP 400, as real servers answer.
- `judge_garbage_rate`: that seeded share of judge answers (score or category) is prose that no strict parser
  accepts, decided per request body (a re-ask with another `seed` param is a new draw).

A true rate limit (`rpm` accepted requests per sliding window of `window_s` seconds) answers 429 with
Retry-After and rate-limit headers (OpenAI x-ratelimit-*, Anthropic anthropic-ratelimit-*); every answer
carries them. Faults, at `fault_rate`, decided by a RNG seeded with (seed, request hash, send count), so a
run is reproducible whatever the arrival order: 429 with Retry-After, 500, 503, a timeout (sleeps
`timeout_sleep_s`), malformed JSON, a truncated body (Content-Length larger than what is sent, then the
connection closes). Each chat request is logged as a JSONL line {t, path, hash, count, outcome}.

Batches advance one state per poll (OpenAI validating -> in_progress -> finalizing -> completed/expired,
finished after max(3, `batch_polls`) polls; Anthropic in_progress -> ended after `batch_polls` polls);
`batch_expire_rate` / `batch_error_rate` make a seeded share of requests expire / fail with a server error
(drawn per custom_id and submission, so a resubmitted request gets a new draw). Batch creations and polls are
logged too ({path, hash: batch id, outcome: created | poll}).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "503", "timeout", "malformed", "truncated")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog (5) drops connections under a burst: a 1 s SYN retry

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up (timeouts) are expected
            super().handle_error(request, client_address)


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha(value: Any) -> str:
    return hashlib.sha256(_canon(value).encode()).hexdigest()


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if isinstance(part, dict):
            if part.get("type") == "text":
                out.append(part.get("text", ""))
            elif part.get("type") == "tool_result":
                out.append(_text(part.get("content")))
    return " ".join(out)


def _tokens(value: Any) -> int:
    return len(_canon(value)) // 4 + 1


def _block_value(text: str, name: str) -> Any:
    """The first JSON line of a delimited block `<<<NAME token>>>` of cso_lib.prompts, or None."""
    m = re.search(r"^<<<" + name + r" [0-9a-f]+>>>\n(.*)$", text, re.M)
    return json.loads(m.group(1)) if m else None


def answer(system: str, messages: list[dict[str, Any]], json_wanted: bool, tool_names: list[str],
           last_is_tool: bool, salt: int = 0) -> tuple[str, Any]:
    """("json", obj) | ("tool", (name, args)) | ("text", str): the deterministic answer to a conversation."""
    h = _sha([system, messages, salt])
    h8 = h[:8]
    low = system.lower()
    last = _text(messages[-1].get("content")) if messages else ""
    if json_wanted or "json" in low:
        if '"correct"' in low:  # the answer judge (cso_lib.answer_judge): lenient containment of the truth
            got, want = (_block_value(last, name) for name in ("RESPONSE", "CORRECT"))
            norm = lambda v: " ".join(re.sub(r"[^\w.]+", " ", str(v).lower()).split())  # noqa: E731
            ok = got is not None and want is not None and norm(want) in norm(got)
            return "json", {"extracted_final_answer": str(got), "reasoning": f"compared {h8}",
                            "correct": "yes" if ok else "no"}
        if '"category"' in low:  # the error-taxonomy judge
            cats = ("tool_invocation", "reasoning", "task_understanding", "information_extraction", "other")
            return "json", {"reasoning": f"classified {h8}", "category": cats[int(h[8:16], 16) % len(cats)]}
        if '"alternatives"' in low or ("alternative" in low and "score" not in low):  # expert prompts
            m = re.search(r"(\d+)\s+alternative", low)
            k = int(m.group(1)) if m else 3
            return "json", {"alternatives": [
                {"thought": f"alternative {j} {h8}", "tool_calls": [{"name": "search", "arguments": {"query": f"{h8}-{j}"}}]}
                for j in range(k)]}
        if "score" in low:
            return "json", {"reasoning": f"judged {h8}", "score": round(int(h[8:16], 16) / 0xFFFFFFFF, 4)}
        return "json", {"echo": last[:100], "id": h8}
    if tool_names and not last_is_tool:
        return "tool", (tool_names[0], {"query": h8})
    return "text", f"echo: {last[:100]} [{h8}]"


class FakeLLMServer:
    """The server; `start()` serves in a daemon thread, `serve_forever()` in the calling one."""

    def __init__(
        self,
        *,
        port: int = 0,
        rpm: int | None = None,
        window_s: float = 60.0,
        fault_rate: float = 0.0,
        faults: tuple[str, ...] = FAULTS,
        seed: int = 0,
        log_path: str | None = None,
        timeout_sleep_s: float = 3.0,
        fault_retry_after_s: float = 0.1,
        rate_headers: bool = True,
        api_key: str | None = None,
        batch_polls: int = 2,
        batch_expire_rate: float = 0.0,
        batch_error_rate: float = 0.0,
        judge_garbage_rate: float = 0.0,
    ) -> None:
        self.rpm, self.window_s = rpm, window_s
        self.fault_rate, self.faults, self.seed = fault_rate, tuple(faults), seed
        self.log_path, self.timeout_sleep_s = log_path, timeout_sleep_s
        self.fault_retry_after_s, self.rate_headers, self.api_key = fault_retry_after_s, rate_headers, api_key
        self.batch_polls, self.batch_expire_rate, self.batch_error_rate = batch_polls, batch_expire_rate, batch_error_rate
        self.judge_garbage_rate = judge_garbage_rate
        self.lock = threading.Lock()
        self.window: deque[float] = deque()
        self.counts: dict[str, int] = {}
        self.log: list[dict[str, Any]] = []
        self.prefixes: set[str] = set()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_submits: dict[str, int] = {}  # custom_id -> batches that carried it (and finished)
        self._ids = 0
        self.httpd = _Server(("127.0.0.1", port), _make_handler(self))
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> FakeLLMServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def new_id(self, prefix: str) -> str:
        with self.lock:
            self._ids += 1
            return f"{prefix}{self._ids:06d}"

    def record(self, path: str, h: str, count: int, outcome: str) -> None:
        entry = {"t": round(time.time(), 4), "path": path, "hash": h, "count": count, "outcome": outcome}
        with self.lock:
            self.log.append(entry)
            if self.log_path:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")

    def admit(self) -> tuple[bool, float, int]:
        """Sliding-window rate limit: (admitted, seconds until a slot frees, remaining after this one)."""
        if not self.rpm:
            return True, 0.0, 0
        with self.lock:
            now = time.monotonic()
            while self.window and self.window[0] <= now - self.window_s:
                self.window.popleft()
            if len(self.window) >= self.rpm:
                return False, self.window[0] + self.window_s - now, 0
            self.window.append(now)
            reset = self.window[0] + self.window_s - now
            return True, reset, self.rpm - len(self.window)

    def rate_header_values(self, anthropic: bool, reset: float, remaining: int) -> dict[str, str]:
        if not (self.rpm and self.rate_headers):
            return {}
        if anthropic:
            at = (datetime.now(UTC) + timedelta(seconds=reset)).isoformat().replace("+00:00", "Z")
            return {"anthropic-ratelimit-requests-limit": str(self.rpm),
                    "anthropic-ratelimit-requests-remaining": str(remaining), "anthropic-ratelimit-requests-reset": at}
        return {"x-ratelimit-limit-requests": str(self.rpm), "x-ratelimit-remaining-requests": str(remaining),
                "x-ratelimit-reset-requests": f"{reset:.3f}s"}

    def sends(self) -> dict[str, int]:
        """How often each request hash was received (any outcome)."""
        with self.lock:
            return dict(self.counts)

    # ---- answers -------------------------------------------------------------------------------------
    def openai_completion(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        system = " ".join(_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
        rest = [m for m in messages if m.get("role") not in ("system", "developer")]
        fmt = (body.get("response_format") or {}).get("type")
        tool_names = [t["function"]["name"] for t in body.get("tools") or []]
        last_is_tool = bool(rest) and rest[-1].get("role") == "tool"
        choices, out_tokens = [], 0
        for i in range(int(body.get("n") or 1)):
            kind, value = answer(system, rest, fmt in ("json_object", "json_schema"), tool_names, last_is_tool, i)
            msg: dict[str, Any] = {"role": "assistant", "content": None}
            finish = "stop"
            if kind == "tool":
                name, args = value
                msg["tool_calls"] = [{"id": f"call_{_sha([i, args])[:12]}", "type": "function",
                                      "function": {"name": name, "arguments": json.dumps(args)}}]
                finish = "tool_calls"
            elif kind == "json" and ("score" in value or "category" in value) and self.judge_garbage_rate and \
                    random.Random(f"{self.seed}|garbage|{_sha(body)}|{i}").random() < self.judge_garbage_rate:
                msg["content"] = "Hard to say. It could be several things; I would not commit to one."
            else:
                msg["content"] = value if kind == "text" else json.dumps(value)
            out_tokens += _tokens(msg)
            choices.append({"index": i, "message": msg, "finish_reason": finish})
        prompt = _tokens(messages) + (_tokens(body["tools"]) if body.get("tools") else 0)
        cached = 0
        if body.get("prompt_cache_key") and len(messages) > 1:
            key = _sha([body["prompt_cache_key"], messages[:-1]])
            with self.lock:
                if key in self.prefixes:
                    cached = min(prompt, _tokens(messages[:-1]))
                self.prefixes.add(key)
        return {"id": f"chatcmpl-{_sha(body)[:12]}", "object": "chat.completion", "created": 0,
                "model": body.get("model"), "choices": choices,
                "usage": {"prompt_tokens": prompt, "completion_tokens": out_tokens,
                          "total_tokens": prompt + out_tokens, "prompt_tokens_details": {"cached_tokens": cached}}}

    def anthropic_message(self, body: dict[str, Any]) -> dict[str, Any]:
        system_raw = body.get("system") or ""
        system = _text(system_raw)
        messages = body.get("messages") or []
        forced = (body.get("tool_choice") or {}).get("name") if (body.get("tool_choice") or {}).get("type") == "tool" else None
        tool_names = [t["name"] for t in body.get("tools") or []]
        last = messages[-1] if messages else {}
        last_is_tool = isinstance(last.get("content"), list) and any(
            b.get("type") == "tool_result" for b in last["content"])
        kind, value = answer(system, messages, forced is not None, tool_names, last_is_tool)
        if forced is not None:
            if forced == "structured_output_value":
                value = {"value": value}
            content = [{"type": "tool_use", "id": f"toolu_{_sha(value)[:12]}", "name": forced, "input": value}]
            stop = "tool_use"
        elif kind == "tool":
            name, args = value
            content = [{"type": "tool_use", "id": f"toolu_{_sha(args)[:12]}", "name": name, "input": args}]
            stop = "tool_use"
        else:
            content = [{"type": "text", "text": value if kind == "text" else json.dumps(value)}]
            stop = "end_turn"
        total = _tokens(messages) + _tokens(system_raw) + (_tokens(body["tools"]) if body.get("tools") else 0)
        usage = {"input_tokens": total, "output_tokens": _tokens(content),
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        if "cache_control" in _canon(body) and len(messages) > 1:
            prefix = [system_raw, messages[:-1]]
            key, size = _sha(prefix), min(total, _tokens(prefix))
            with self.lock:
                seen = key in self.prefixes
                self.prefixes.add(key)
            usage["cache_read_input_tokens" if seen else "cache_creation_input_tokens"] = size
            usage["input_tokens"] = total - size
        return {"id": f"msg_{_sha(body)[:12]}", "type": "message", "role": "assistant", "model": body.get("model"),
                "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage}

    # ---- batches -------------------------------------------------------------------------------------
    def batch_fate(self, custom_id: str) -> str:
        """ok, expired or error: a seeded draw per (custom_id, how often it was submitted), so a resubmission
        is a new draw."""
        with self.lock:
            self.batch_submits[custom_id] = n = self.batch_submits.get(custom_id, 0) + 1
        r = random.Random(f"{self.seed}|batch|{custom_id}" + (f"|{n}" if n > 1 else "")).random()
        if r < self.batch_expire_rate:
            return "expired"
        if r < self.batch_expire_rate + self.batch_error_rate:
            return "error"
        return "ok"

    def finish_openai_batch(self, b: dict[str, Any]) -> None:
        out, err = [], []
        for line in self.files[b["input_file_id"]].decode().splitlines():
            if not line.strip():
                continue
            req = json.loads(line)
            cid, body = req["custom_id"], req["body"]
            fate = self.batch_fate(cid)
            rid = self.new_id("batch_req_")
            status = _status_of(body.get("model"))
            if fate == "expired" and not status:
                err.append({"id": rid, "custom_id": cid, "response": None,
                            "error": {"code": "batch_expired", "message": "This request could not be executed "
                                      "before the completion window expired."}})
            elif fate == "error" or status:
                code = status or 500
                err.append({"id": rid, "custom_id": cid, "response": {"status_code": code, "request_id": rid,
                            "body": {"error": {"message": f"fake error {code}", "type": "server_error"}}},
                            "error": None})
            else:
                out.append({"id": rid, "custom_id": cid, "response": {"status_code": 200, "request_id": rid,
                            "body": self.openai_completion(body)}, "error": None})
        for name, lines in (("output_file_id", out), ("error_file_id", err)):
            if lines:
                fid = self.new_id("file-")
                self.files[fid] = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
                b[name] = fid
        b["status"] = "expired" if any(x.get("error") for x in err) else "completed"
        b["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}

    def finish_anthropic_batch(self, b: dict[str, Any]) -> None:
        lines, counts = [], {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for item in b["requests"]:
            cid, params = item["custom_id"], item["params"]
            fate = self.batch_fate(cid)
            status = _status_of(params.get("model"))
            if fate == "expired" and not status:
                result: dict[str, Any] = {"type": "expired"}
            elif fate == "error" or status:
                kind = "invalid_request_error" if status and status < 500 else "api_error"
                result = {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": "fake"}}}
            else:
                result = {"type": "succeeded", "message": self.anthropic_message(params)}
            counts["errored" if result["type"] == "errored" else result["type"]] += 1
            lines.append({"custom_id": cid, "result": result})
        b["results"] = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
        b["processing_status"] = "ended"
        b["request_counts"] = counts
        b["results_url"] = f"{self.url}/v1/messages/batches/{b['id']}/results"
        b["ended_at"] = datetime.now(UTC).isoformat()


SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def invalid_request(body: dict[str, Any], anthropic: bool) -> str | None:
    """Why a real provider would refuse this body's structured-output schema or tool schemas (HTTP 400), or None."""
    schemas = []
    if anthropic:
        schemas = [("tools[].input_schema", t.get("input_schema")) for t in body.get("tools") or []]
        if any(not isinstance(s, dict) or s.get("type") != "object" for _, s in schemas):
            return "tools[].input_schema: must be a JSON schema of type 'object'"
    else:
        fmt = body.get("response_format") or {}
        if fmt.get("type") == "json_schema":
            schemas.append(("response_format.json_schema.schema", (fmt.get("json_schema") or {}).get("schema")))
        schemas += [("tools[].function.parameters", (t.get("function") or {}).get("parameters"))
                    for t in body.get("tools") or [] if (t.get("function") or {}).get("parameters") is not None]
    for where, schema in schemas:
        if not isinstance(schema, dict) or schema.get("type") not in SCHEMA_TYPES:
            return f"{where}: not a JSON schema (type {(schema or {}).get('type')!r})"
    return None


def _status_of(model: Any) -> int | None:
    m = re.fullmatch(r"status-(\d{3})", str(model or ""))
    return int(m.group(1)) if m else None


def _make_handler(srv: FakeLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        # ---- plumbing ---------------------------------------------------------------------------------
        def body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def reply(self, status: int, payload: Any, headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(data)
            except OSError:
                self.close_connection = True

        def authorized(self, anthropic: bool) -> bool:
            if srv.api_key is None:
                return True
            if anthropic:
                given = self.headers.get("x-api-key") or ""
            else:
                given = self.headers.get("api-key") or (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            if given == srv.api_key:
                return True
            self.reply(401, {"error": {"type": "authentication_error",
                                       "message": f"Incorrect API key provided: {given}"}})
            return False

        # ---- routes -----------------------------------------------------------------------------------
        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            raw = self.body()
            anthropic = path.startswith("/v1/messages")
            if not self.authorized(anthropic):
                return
            if path.endswith("/chat/completions") or path == "/v1/messages":
                self.chat(path, raw, anthropic)
            elif path == "/v1/files":
                self.upload(raw)
            elif path == "/v1/batches":
                body = json.loads(raw)
                if body.get("input_file_id") not in srv.files:
                    return self.reply(404, {"error": {"message": "no such file"}})
                bid = srv.new_id("batch_")
                srv.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "status": "validating",
                                    "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                                    "created_at": int(time.time()), "output_file_id": None, "error_file_id": None,
                                    "errors": None, "polls": 0,
                                    "request_counts": {"total": 0, "completed": 0, "failed": 0}}
                srv.record(path, bid, 1, "created")
                self.reply(200, _public(srv.batches[bid]))
            elif path == "/v1/messages/batches":
                body = json.loads(raw)
                bid = srv.new_id("msgbatch_")
                srv.batches[bid] = {"id": bid, "type": "message_batch", "processing_status": "in_progress",
                                    "requests": body["requests"], "polls": 0, "results_url": None, "ended_at": None,
                                    "request_counts": {"processing": len(body["requests"]), "succeeded": 0,
                                                       "errored": 0, "canceled": 0, "expired": 0}}
                srv.record(path, bid, 1, "created")
                self.reply(200, _public(srv.batches[bid]))
            elif re.fullmatch(r"/v1/(messages/)?batches/[^/]+/cancel", path):
                bid = path.split("/")[-2]
                b = srv.batches.get(bid)
                if b is None:
                    return self.reply(404, {"error": {"message": "no such batch"}})
                b["cancel"] = True
                self.reply(200, _public(b))
            else:
                self.reply(404, {"error": {"message": f"no route {path}"}})

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            anthropic = path.startswith("/v1/messages")
            if not self.authorized(anthropic):
                return
            m = re.fullmatch(r"/v1/files/([^/]+)/content", path)
            if m:
                data = srv.files.get(m.group(1))
                if data is None:
                    return self.reply(404, {"error": {"message": "no such file"}})
                return self.reply(200, data, content_type="application/octet-stream")
            m = re.fullmatch(r"/v1/(messages/)?batches/([^/]+)(/results)?", path)
            if not m or m.group(2) not in srv.batches:
                return self.reply(404, {"error": {"message": f"no route {path}"}})
            b = srv.batches[m.group(2)]
            if m.group(3):
                if b.get("results") is None:
                    return self.reply(404, {"error": {"message": "results not ready"}})
                return self.reply(200, b["results"], content_type="application/binary")
            srv.record(path, b["id"], b["polls"] + 1, "poll")
            with srv.lock:
                b["polls"] += 1
                polls = b["polls"]
            if m.group(1):
                if b["processing_status"] == "in_progress" and polls >= srv.batch_polls:
                    srv.finish_anthropic_batch(b)
            elif b["status"] not in ("completed", "expired", "failed", "cancelled"):
                steps = ["validating", "in_progress", "finalizing"]
                bad = [i for i, line in enumerate(srv.files[b["input_file_id"]].decode().splitlines())
                       if line.strip() and json.loads(line).get("url") != b["endpoint"]]
                if bad:  # rejected at validation, as OpenAI does for lines that do not match the endpoint
                    b["status"] = "failed"
                    b["errors"] = {"object": "list", "data": [
                        {"code": "invalid_url", "message": "url does not match the batch endpoint", "line": i + 1}
                        for i in bad]}
                elif polls >= max(len(steps), srv.batch_polls):
                    srv.finish_openai_batch(b)
                else:
                    b["status"] = steps[min(polls, len(steps) - 1)]
            self.reply(200, _public(b))

        def upload(self, raw: bytes) -> None:
            ctype = self.headers.get("Content-Type") or ""
            msg = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
            fields: dict[str, tuple[str | None, bytes]] = {}
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
            if "file" not in fields or fields.get("purpose", (None, b""))[1] != b"batch":
                return self.reply(400, {"error": {"message": "need a file and purpose=batch"}})
            fid = srv.new_id("file-")
            srv.files[fid] = fields["file"][1]
            self.reply(200, {"id": fid, "object": "file", "bytes": len(srv.files[fid]), "created_at": int(time.time()),
                             "filename": fields["file"][0], "purpose": "batch"})

        def chat(self, path: str, raw: bytes, anthropic: bool) -> None:
            try:
                body = json.loads(raw)
            except ValueError:
                return self.reply(400, {"error": {"message": "body is not JSON"}})
            h = _sha(body)
            with srv.lock:
                srv.counts[h] = count = srv.counts.get(h, 0) + 1
            admitted, reset, remaining = srv.admit()
            rate = srv.rate_header_values(anthropic, reset, remaining)
            if not admitted:
                srv.record(path, h, count, "429-limit")
                return self.reply(429, {"error": {"type": "rate_limit_error", "message": "rate limit reached"}},
                                  {**rate, "retry-after": f"{reset:.3f}", "retry-after-ms": str(int(reset * 1000))})
            why = invalid_request(body, anthropic)
            if why:
                srv.record(path, h, count, "400")
                return self.reply(400, {"error": {"type": "invalid_request_error", "message": why}})
            status = _status_of(body.get("model"))
            if status:
                srv.record(path, h, count, str(status))
                return self.reply(status, {"error": {"type": "invalid_request_error", "message": f"status {status}"}})
            rng = random.Random(f"{srv.seed}|{h}|{count}")
            fault = rng.choice(srv.faults) if srv.faults and rng.random() < srv.fault_rate else None
            srv.record(path, h, count, fault or "ok")
            if fault == "429":
                ra = srv.fault_retry_after_s
                return self.reply(429, {"error": {"type": "rate_limit_error", "message": "injected"}},
                                  {**rate, "retry-after": f"{ra:.3f}", "retry-after-ms": str(int(ra * 1000))})
            if fault in ("500", "503"):
                return self.reply(int(fault), {"error": {"type": "server_error", "message": "injected"}}, rate)
            if fault == "timeout":
                time.sleep(srv.timeout_sleep_s)
            payload = json.dumps(srv.anthropic_message(body) if anthropic else srv.openai_completion(body)).encode()
            if fault == "malformed":
                return self.reply(200, payload[: len(payload) // 2] + b"}}", rate)
            if fault == "truncated":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload) + 100))
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.reply(200, payload, rate)

    return Handler


def _public(b: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in b.items() if k not in ("polls", "requests", "results", "cancel")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rpm", type=int, default=None, help="accepted requests per window (none: unlimited)")
    p.add_argument("--window-s", type=float, default=60.0, help="length of the rate-limit window")
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated subset of " + ",".join(FAULTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="append-only JSONL request log")
    p.add_argument("--timeout-sleep-s", type=float, default=3.0)
    p.add_argument("--no-rate-headers", action="store_true")
    p.add_argument("--api-key", default=None, help="require this key (tests of key handling)")
    a = p.parse_args(argv)
    srv = FakeLLMServer(port=a.port, rpm=a.rpm, window_s=a.window_s, fault_rate=a.fault_rate,
                        faults=tuple(f for f in a.faults.split(",") if f), seed=a.seed, log_path=a.log,
                        timeout_sleep_s=a.timeout_sleep_s, rate_headers=not a.no_rate_headers, api_key=a.api_key)
    print(f"READY {srv.port}", flush=True)
    try:
        srv.httpd.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
