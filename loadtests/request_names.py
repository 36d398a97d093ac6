"""The names under which the locustfile reports its requests, shared with the CSV reader.

Kept apart from the locustfile because importing locust monkey-patches the
process with gevent; the report code must not pay for that.
"""

from __future__ import annotations

EVENT_NAME = "/users/[id]/events"


def recommend_name(mode: str) -> str:
    """``/recommend [beam]`` or ``/recommend [ved]``: one stats row per mode, even in a mixed run."""
    return f"/recommend [{mode}]"
