"""The `cso` command line: the pipeline, each stage, the simulation, SQL over the warehouse.

    cso run                                  # everything, on the embedded default (local Spark, simulation)
    cso run --config my.yaml --set cso.k=3   # YAML plus overrides
    cso sql "SELECT reason, count(*) FROM critical_candidates GROUP BY reason"
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cso_lib.config import Config, load_config
from cso_lib.entry import setup_logging
from cso_lib.errors import CSOError

app = typer.Typer(help="Critical Step Optimization on Spark + Delta.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML configuration file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.key=value (repeatable).")]
RunOpt = Annotated[str | None, typer.Option("--run-id", help="Run to work on or resume.")]


def _cfg(config: str | None, overrides: list[str] | None, run_id: str | None = None, **extra) -> Config:
    items = list(overrides or [])
    if run_id:
        items.append(f"run_id={run_id}")
    items += [f"{k}={v}" for k, v in extra.items() if v is not None]
    return load_config(config, items)


def _with_spark(cfg: Config, name: str, fn):
    """Run fn(cfg, spark) in a session named after the command, stopped afterwards; CSO errors exit 2."""
    setup_logging()
    try:
        from cso_lib.spark import build_spark

        spark = build_spark(cfg, name)
        try:
            return fn(cfg, spark)
        finally:
            spark.stop()
    except CSOError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e


def _config(*args, **kw) -> Config:
    try:
        return _cfg(*args, **kw)
    except CSOError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e


@app.command()
def run(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    run_id: RunOpt = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Pairs straight from candidates (ablation).")] = False,
    order: Annotated[str | None, typer.Option(help="prm_first (default) or paper.")] = None,
    skip_ingest: Annotated[bool, typer.Option(help="Mine what is already in the warehouse.")] = False,
    no_exports: Annotated[bool, typer.Option("--no-exports", help="Skip the export stage (data card, ...).")] = False,
) -> None:
    """Run the whole pipeline and print the summary."""
    from cso_lib.stages import pipeline

    cfg = _config(config, overrides, run_id, **{"cso.verify": "false" if no_verify else None, "cso.order": order})
    result = _with_spark(cfg, "pipeline", lambda c, s: pipeline.run(c, s, skip_ingest=skip_ingest,
                                                                    exports=not no_exports))
    typer.echo(f"summary written to {cfg.storage.warehouse}/_summaries/{result['summary']['run_id']}.json")


def _stage_command(name: str, help_text: str) -> None:
    def command(config: ConfigOpt = None, overrides: SetOpt = None, run_id: RunOpt = None) -> None:
        from cso_lib.stages.pipeline import STAGES

        result = _with_spark(_config(config, overrides, run_id), name, STAGES[name])
        typer.echo(json.dumps(result, indent=2, default=str))

    command.__doc__ = help_text
    app.command(name=name.replace("_", "-"))(command)


for _name, _help in [
    ("ingest", "Ingest raw logs into trajectories / steps / quarantine."),
    ("select", "Select the failed trajectories of a run (its work set)."),
    ("score_policy", "PRM scores of the policy's own actions."),
    ("propose", "Expert alternatives where a step can still qualify."),
    ("score_alternatives", "PRM scores of alternatives, then candidate selection."),
    ("rollouts", "Branch rollouts with verification."),
    ("build_pairs", "Pairs into critical_steps and dpo_pairs/."),
    ("taxonomy", "Error category of each verified critical step, from the judge model."),
]:
    _stage_command(_name, _help)


@app.command()
def export(config: ConfigOpt = None, overrides: SetOpt = None, run_id: RunOpt = None) -> None:
    """Data card, LLaMA-Factory file, step credit and PRM stepwise data of the round's pairs (`cso run` does it)."""
    from cso_lib.stages import export as ex

    result = _with_spark(_config(config, overrides, run_id), "export", ex.run)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def train(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """DPO on the round's pairs (TRL; no Spark). Multi-GPU: accelerate launch jobs/train_dpo.py (README)."""
    from cso_lib.train import train as train_dpo

    setup_logging()
    try:
        result = train_dpo(_config(config, overrides))
    except CSOError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2, default=str))


@app.command()
def housekeeping(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Delta housekeeping: table properties, OPTIMIZE Z-ordered on analysts' columns, VACUUM (housekeeping.*)."""
    from cso_lib.stages import housekeeping as hk

    result = _with_spark(_config(config, overrides), "housekeeping", hk.run)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def evaluate(config: ConfigOpt = None, overrides: SetOpt = None, run_id: RunOpt = None) -> None:
    """Success rate of the configured policy on held-out simulation tasks (95% Wilson CI) into policy_evals."""
    from cso_lib.stages import evaluate as ev

    result = _with_spark(_config(config, overrides, run_id), "evaluate", ev.run)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def iterate(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds to run (default iterate.rounds).")] = None,
) -> None:
    """CSO rounds: evaluate the policy, mine its failures, train (DPO), register the new version; repeat."""
    from cso_lib.stages import iterate as it

    result = _with_spark(_config(config, overrides), "iterate", lambda c, s: it.run(c, s, rounds))
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def baselines(config: ConfigOpt = None, overrides: SetOpt = None, run_id: RunOpt = None) -> None:
    """Baseline datasets for A/B against CSO: Step-DPO, ETO-style trajectory pairs, RFT."""
    from cso_lib.stages import baselines as bl

    result = _with_spark(_config(config, overrides, run_id), "baselines", bl.run)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def cost(config: ConfigOpt = None, overrides: SetOpt = None, run_id: RunOpt = None) -> None:
    """Cost and tokens of the model calls by stage and model, and the projected cost of the remaining work."""
    from cso_lib.stages import cost as cost_stage

    cost_stage.render(_with_spark(_config(config, overrides, run_id), "cost", cost_stage.report))


@app.command()
def simulate(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Write the simulation world's logs (native JSONL) to sim.logs_dir."""
    from cso_lib.stages import simulate as sim

    typer.echo(json.dumps(sim.run(_config(config, overrides)), indent=2))


@app.command()
def summary(config: ConfigOpt = None, overrides: SetOpt = None, run_id: RunOpt = None) -> None:
    """Print the summary of a run (default: the latest)."""
    from cso_lib.stages import summary as summ

    summ.render(_with_spark(_config(config, overrides, run_id), "summary", summ.compute))


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="Spark SQL; bare table names refer to the warehouse's Delta tables.")],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 50,
) -> None:
    """Run Spark SQL over the warehouse (each Delta table is a temporary view of its name)."""
    from rich.console import Console
    from rich.table import Table

    from cso_lib.delta_io import read_table
    from schemas.tables import TABLES

    def go(cfg, spark):
        for name in TABLES:
            read_table(spark, cfg, name).createOrReplaceTempView(name)
        df = spark.sql(query)
        table = Table(*df.columns)
        for row in df.limit(limit).collect():
            table.add_row(*[str(v) for v in row])
        Console().print(table)

    _with_spark(_config(config, overrides), "sql", go)


if __name__ == "__main__":
    app()
