"""The line protocol every job worker speaks: a JSON spec on stdin, one JSON event per stdout line.

A worker (``forward_worker``, ``latents_worker``, ``safety_worker``) supplies ``run(spec, root) -> final event``;
:func:`serve` reads the spec, reports a spec that is not JSON as an error event, runs it against the cache root
(``$PROBEKIT_CACHE`` or ``cache``) and emits the final event. The exit status is 0 only for a ``done`` event.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable


def emit(**event) -> None:
    """One event as one JSON line, flushed at once (the app reads the stream while the job runs)."""
    print(json.dumps(event), flush=True)


def serve(run: Callable[[dict, str], dict], *, first_status: str | None = None) -> int:
    """Read the spec from stdin, run it, emit its final event; the process exit status."""
    try:
        spec = json.loads(sys.stdin.read())
    except json.JSONDecodeError as e:
        emit(event="error", message=f"bad request: {e}")
        return 1
    if first_status:
        emit(event="status", message=first_status)
    final = run(spec, os.environ.get("PROBEKIT_CACHE") or "cache")
    emit(**final)
    return 0 if final["event"] == "done" else 1
