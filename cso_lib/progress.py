"""Driver-side progress of a model stage: requests answered / failed, tokens, cost so far (requests answered
from the ledger cost nothing and are not sent, so they do not show here).

Executors journal every answer as it arrives (cso_lib.ledger.Journal), so the driver can watch the journal
folder while the Spark job runs, without any channel back from the executors.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from rich.console import Console


def journal_totals(folder: str) -> dict[str, float]:
    """Sums over the journal files now in `folder` (lines being written are skipped until complete)."""
    totals = {"answered": 0, "failed": 0, "input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0,
              "cost_usd": 0.0}
    path = Path(folder)
    for f in path.glob("*.jsonl") if path.is_dir() else []:
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            totals["answered" if row.get("status") == "ok" else "failed"] += 1
            for key in ("input_tokens", "cached_input_tokens", "output_tokens"):
                totals[key] += row.get(key) or 0
            totals["cost_usd"] += row.get("cost_usd") or 0.0
    return totals


class StageProgress:
    """Shows journal totals for a stage every `every_s` seconds on stderr while the stage runs."""

    def __init__(self, folder: str, stage: str, every_s: float = 2.0) -> None:
        self.folder, self.stage, self.every_s = folder, stage, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.console = Console(stderr=True)

    def line(self) -> str:
        t = journal_totals(self.folder)
        return (f"{self.stage}: {int(t['answered'])} answered, {int(t['failed'])} failed | tokens in "
                f"{int(t['input_tokens'])} (cached {int(t['cached_input_tokens'])}) out {int(t['output_tokens'])} | "
                f"${t['cost_usd']:.4f}")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.console.print(self.line(), highlight=False)

    def __enter__(self) -> StageProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.console.print(self.line(), highlight=False)
