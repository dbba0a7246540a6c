"""Speed and memory measurements (``make bench`` / ``python -m benchmarks``); not tests."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_measurement(args: list[str], case: str) -> dict[str, Any]:
    """Run ``python ARGS`` in a fresh process (its own peak memory); parse its last JSON line."""
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["case"] = case
    return row
