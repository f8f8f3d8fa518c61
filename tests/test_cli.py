"""The command line and the job entry points' argument parsing (no Spark)."""

import json

from typer.testing import CliRunner

from cso_lib.cli import app
from cso_lib.entry import parse_args


def test_simulate_writes_native_logs(tmp_path):
    result = CliRunner().invoke(app, ["simulate", "--set", "sim.n_tasks=5", "--set", f"sim.logs_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    lines = (tmp_path / out["path"].split("/")[-1]).read_text().splitlines()
    assert out["trajectories"] == 5 == len(lines)
    assert {"trajectory_id", "steps", "ground_truth", "outcome"} <= set(json.loads(lines[0]))


def test_bad_override_exits_2_with_the_reason():
    result = CliRunner().invoke(app, ["simulate", "--set", "cso.gamma_low=2"])
    assert result.exit_code == 2 and "gamma_low" in result.output


def test_job_arguments(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("cso:\n  k: 3\n")
    cfg = parse_args(["--config", str(cfg_file), "--set", "cso.order=paper", "--run-id", "r1"])
    assert (cfg.cso.k, cfg.cso.order, cfg.run_id) == (3, "paper", "r1")


def test_every_stage_has_a_job_and_a_command():
    from pathlib import Path

    from cso_lib.stages.pipeline import STAGES

    jobs = Path(__file__).resolve().parent.parent / "jobs"
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    for stage in STAGES:
        assert (jobs / f"{stage}.py").is_file() and stage.replace("_", "-") in names
    assert (jobs / "pipeline.py").is_file() and "run" in names
