"""What every Spark entry point shares: argument parsing, logging, the session, the exit code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from pyspark.sql import SparkSession

from cso_lib.config import Config, load_config
from cso_lib.errors import CSOError


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("py4j").setLevel(logging.WARNING)


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description="cso Spark job")
    p.add_argument("--config", help="YAML configuration file (defaults: the embedded local setup)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set cso.gamma_low=0.4 (repeatable)")
    p.add_argument("--run-id", help="run to work on / resume")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"run_id={args.run_id}"] if args.run_id else [])
    return load_config(args.config, overrides)


def run_job(main: Callable[[Config, SparkSession], dict], name: str, argv: list[str] | None = None) -> None:
    """Parse arguments, build the session, run `main`, print its result as JSON; exit 2 on a cso error."""
    from cso_lib.spark import build_spark

    setup_logging()
    try:
        cfg = parse_args(argv)
        spark = build_spark(cfg, name)
        try:
            result = main(cfg, spark)
        finally:
            spark.stop()
    except CSOError as e:
        logging.getLogger("cso").error("%s failed: %s", name, e)
        sys.exit(2)
    print(json.dumps(result, indent=2, default=str))
