"""The JSON reports of the commands (``--json``): one object per command, schema version 1.

Every report has ``"version": 1`` and ``"command"``; bytes are integers, seconds floats,
positions integers (None when unknown); key names are the same on a source and a replica.
docs/json.md describes each command's report.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMA_VERSION = 1


def report(command: str, **fields: Any) -> dict[str, Any]:
    """A command's report with its version and command name first."""
    return {"version": SCHEMA_VERSION, "command": command, **fields}


def print_json(doc: dict[str, Any]) -> None:
    """Print a report as one indented JSON object."""
    print(json.dumps(doc, indent=1, sort_keys=True), flush=True)
