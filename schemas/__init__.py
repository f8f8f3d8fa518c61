"""Table schemas as code (tables.py) and the JSON Schema of the native input log (trajectory.schema.json)."""

from pathlib import Path

TRAJECTORY_JSON_SCHEMA = Path(__file__).with_name("trajectory.schema.json")
