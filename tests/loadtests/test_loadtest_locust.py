"""The locustfile under real locust, against a stub server on 127.0.0.1 for one second per mode.

Not a load test (nothing is timed or asserted about speed): it checks that the
locustfile loads, sends bodies in the service's request contract, and that
``run_plan`` turns what locust writes into the table, plot and JSON.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadtests.runner import LOCUSTFILE, LoadTestPlan, run_plan
from service.schemas import request_models
from service.settings import Settings


class StubService(BaseHTTPRequestHandler):
    """Answers like the service: k items, cap hits and fallbacks for VED, some answers cached; remembers every body
    it got."""

    bodies: list[tuple[str, dict]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.reply({"status": "ready"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.bodies.append((self.path, body))
        if self.path == "/recommend":
            # every third answer "cached"; the others, for VED, hit the cap and fall back (never cached, as served)
            cached, ved = len(self.bodies) % 3 == 0, body["mode"] == "ved"
            items = [{"sid": "<a_0><b_0><c_0>", "item_ids": [i], "score": 0.0} for i in range(body["k"])]
            search = {"tokens_spent": 3, "nodes": 1, "max_depth": 3, "iterations": 1, "fallback": "initial_beam"}
            hit = ved and not cached
            self.reply(
                {
                    "items": items,
                    "mode": body["mode"],
                    "cap_hit": hit,
                    "search": search if ved else None,
                    "cached": cached,
                }
            )
        else:
            self.reply({"user_id": self.path.split("/")[2], "stored": 1})


@pytest.fixture
def stub_url() -> Iterator[str]:
    StubService.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_locustfile_lists_both_user_classes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--list"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "BeamUser" in out.stdout and "VedUser" in out.stdout


@pytest.mark.slow
def test_run_plan_against_a_stub(stub_url: str, tiny_data_dir: Path, tmp_path: Path) -> None:
    plan = LoadTestPlan(
        host=stub_url, data=tiny_data_dir, out=tmp_path / "lt", users=(1,), duration_s=2, k=5, latency_ms=40,
        event_share=0.5,
    )  # fmt: skip
    points, paths = run_plan(plan, echo=lambda _: None)
    assert [(p.mode, p.users) for p in points] == [("beam", 1), ("ved", 1)]
    beam, ved = points
    assert beam.recommend.requests > 0 and beam.failures == 0 and beam.cap_hits == 0 and beam.fallbacks == 0
    assert ved.responses == ved.recommend.requests > 0 and ved.cap_hit_share == 1.0
    assert 0 < ved.cached < ved.responses and 0 < beam.cached < beam.responses
    assert ved.fallbacks == ved.responses and ved.popular == 0 and ved.cap_hits == ved.decoded
    assert ved.ved_tokens == 3 * ved.responses and beam.ved_tokens == 0
    assert paths["table"].read_text().count("\n") == 4 and paths["plot"].exists()

    recommends = [b for path, b in StubService.bodies if path == "/recommend"]
    assert {b["mode"] for b in recommends} == {"beam", "ved"} and all(b["k"] == 5 for b in recommends)
    assert all(b.get("latency_ms") == 40 for b in recommends if b["mode"] == "ved")
    assert all("latency_ms" not in b for b in recommends if b["mode"] == "beam")
    assert all(isinstance(i, int) for b in recommends for i in b.get("history", []))
    users = [path.split("/")[2] for path, _ in StubService.bodies if path != "/recommend"]
    named = [re.fullmatch(r"loadtest-([0-9a-f]{8})-(beam|ved)-\d+", user) for user in users]
    assert all(named), users
    runs = {m.group(2): m.group(1) for m in named if m}
    # each point's users are its own, so none reads back what an earlier point stored
    assert set(runs) == {"beam", "ved"} and runs["beam"] != runs["ved"], users
    # the service's own request models (strict, closed), as it validates them
    models = request_models(Settings())
    for path, body in StubService.bodies:
        model = models.recommend if path == "/recommend" else models.events
        model.model_validate(body)
        if path != "/recommend":
            assert re.fullmatch(models.user_id_pattern, path.split("/")[2])
