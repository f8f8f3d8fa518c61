"""Driver-side progress read from the journal. Pure Python."""

from cso_lib.ledger import Journal
from cso_lib.progress import StageProgress, journal_totals


def test_totals_follow_the_journal(tmp_path):
    folder = tmp_path / "journal"
    assert journal_totals(str(folder))["answered"] == 0
    j = Journal(str(folder))
    j.append({"status": "ok", "input_tokens": 100, "cached_input_tokens": 60, "output_tokens": 7, "cost_usd": 0.5})
    j.append({"status": "error", "input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0, "cost_usd": None})
    with open(next(folder.glob("*.jsonl")), "a") as f:
        f.write('{"status": "ok", "input_tok')  # a line still being written is not counted
    t = journal_totals(str(folder))
    assert (t["answered"], t["failed"], t["input_tokens"], t["cached_input_tokens"], t["output_tokens"]) == (1, 1, 100, 60, 7)
    assert t["cost_usd"] == 0.5
    line = StageProgress(str(folder), "score_policy").line()
    assert line.startswith("score_policy: 1 answered, 1 failed") and "(cached 60)" in line and "$0.5000" in line
