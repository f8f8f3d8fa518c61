"""Outcome verification of a final answer against the ground truth.

>>> verify("  The answer is PARIS. ", "paris")
(True, 'exact: match')
>>> verify("3.1416", "3.14159")
(True, 'numeric: |3.1416 - 3.14159| <= 0.001')
>>> verify("b, a", ["a", "b"])
(True, 'set: match')
>>> verify(None, "x")
(False, 'no answer')
>>> verify("x", None)
(None, 'no ground truth')
"""

from __future__ import annotations

import json
import math
import re
import string
import unicodedata
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PREFIX = re.compile(r"^(final answer|the answer is|answer)\s*[:\-]?\s*")


def normalize(text: str) -> str:
    """Lower-case, strip accents, a leading 'the answer is', punctuation, articles and extra spaces."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode().lower().strip()
    text = _PREFIX.sub("", text)
    text = text.translate(str.maketrans("", "", string.punctuation.replace(".", "").replace("-", "")))
    text = text.rstrip(".")
    stripped = " ".join(_ARTICLES.sub(" ", text).split())
    return stripped or " ".join(text.split())


def _number(text: str) -> float | None:
    cleaned = normalize(text).replace(",", "").replace("$", "").replace("%", "").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _as_list(ground_truth: Any) -> list[str] | None:
    if isinstance(ground_truth, list):
        return [str(x) for x in ground_truth]
    if isinstance(ground_truth, str) and ground_truth.strip().startswith("["):
        try:
            parsed = json.loads(ground_truth)
        except ValueError:
            return None
        return [str(x) for x in parsed] if isinstance(parsed, list) else None
    return None


def verify(answer: str | None, ground_truth: Any, rel_tol: float = 1e-3) -> tuple[bool | None, str]:
    """(success, verdict). success is None when there is no ground truth to check against."""
    if ground_truth is None:
        return None, "no ground truth"
    if answer is None or not str(answer).strip():
        return False, "no answer"
    items = _as_list(ground_truth)
    if items is not None:
        got = {normalize(x) for x in re.split(r"[,;\n]| and ", str(answer)) if normalize(x)}
        want = {normalize(x) for x in items}
        return got == want, "set: match" if got == want else f"set: {sorted(got)} != {sorted(want)}"
    want_num, got_num = _number(str(ground_truth)), _number(str(answer))
    if want_num is not None and got_num is not None:
        ok = math.isclose(got_num, want_num, rel_tol=rel_tol, abs_tol=1e-9)
        op = "<=" if ok else ">"
        return ok, f"numeric: |{got_num:g} - {want_num:g}| {op} {rel_tol:g}"
    ok = normalize(str(answer)) == normalize(str(ground_truth))
    return ok, "exact: match" if ok else f"exact: {normalize(str(answer))!r} != {normalize(str(ground_truth))!r}"
