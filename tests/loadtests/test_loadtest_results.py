"""Parsing locust's stats CSV, joining the cap-hit counts, and rendering the table and plot.

Synthetic CSV text in locust 2.x's ``_stats.csv`` layout stands in for real runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests.results import (
    PointResult,
    markdown_table,
    plot_latency,
    read_failures,
    read_point,
    read_stats_csv,
    write_report,
)

HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
    "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)


def stats_csv(mode: str, requests: int, failures: int, rps: float, p50: int, p95: int, p99: int) -> str:
    """A three-row locust stats file: /recommend for ``mode``, events, Aggregated."""
    pct = f"{p50},{p50},{p50},{p95},{p95},{p95},{p99},{p99},{p99},{p99},{p99 + 5}"
    return "\n".join([
        HEADER,
        f"POST,/recommend [{mode}],{requests},{failures},{p50},{p50 + 1.5},1.2,{p99 + 5},400.0,{rps},0.0,{pct}",
        "POST,/users/[id]/events,10,1,3,3.5,1.0,9.0,12.0,2.5,0.25,3,3,3,4,5,6,7,8,9,9,9",
        f",Aggregated,{requests + 10},{failures + 1},{p50},{p50},1.0,{p99 + 5},380.0,{rps + 2.5},0.25,{pct}",
    ]) + "\n"  # fmt: skip


def write_point(tmp: Path, mode: str, users: int, extra: dict | None, **stats: float) -> Path:
    prefix = tmp / f"{mode}_u{users}"
    prefix.with_name(prefix.name + "_final_stats.csv").write_text(stats_csv(mode, **stats))  # type: ignore[arg-type]
    if extra is not None:
        prefix.with_name(prefix.name + "_extra.json").write_text(json.dumps(extra))
    return prefix


def test_read_stats_csv_rows_by_name(tmp_path: Path) -> None:
    path = tmp_path / "x_stats.csv"
    path.write_text(stats_csv("beam", requests=400, failures=2, rps=40.0, p50=12, p95=30, p99=45))
    rows = read_stats_csv(path)
    assert set(rows) == {"/recommend [beam]", "/users/[id]/events", "Aggregated"}
    beam = rows["/recommend [beam]"]
    assert (beam.requests, beam.failures, beam.rps) == (400, 2, 40.0)
    assert (beam.p50_ms, beam.p95_ms, beam.p99_ms, beam.max_ms) == (12, 30, 45, 50)


def test_na_percentiles_read_as_none(tmp_path: Path) -> None:
    path = tmp_path / "x_stats.csv"
    na = ",".join(["N/A"] * 11)
    path.write_text(f"{HEADER}\n,Aggregated,0,0,0,0.0,0,0,0.0,0.0,0.0,{na}\n")
    row = read_stats_csv(path)["Aggregated"]
    assert row.requests == 0 and row.p50_ms is None and row.p99_ms is None


def test_missing_file_and_wrong_columns_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no stats file"):
        read_stats_csv(tmp_path / "absent_stats.csv")
    bad = tmp_path / "bad_stats.csv"
    bad.write_text("Type,Name,Request Count\nPOST,/x,1\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_stats_csv(bad)


def test_read_point_joins_counts_of_its_mode(tmp_path: Path) -> None:
    extra = {
        "ved": {"responses": 190, "cap_hits": 19, "cached": 4, "fallbacks": 7, "popular": 2, "ved_tokens": 5000},
        "beam": {"responses": 1},
    }
    prefix = write_point(tmp_path, "ved", 8, extra, requests=200, failures=10, rps=20.0, p50=40, p95=55, p99=60)
    point = read_point(prefix, "ved", 8)
    assert point.recommend.name == "/recommend [ved]"
    assert point.events is not None and point.events.requests == 10
    assert (point.responses, point.cap_hits, point.cached, point.ved_tokens) == (190, 19, 4, 5000)
    assert (point.fallbacks, point.popular, point.decoded) == (7, 2, 186)
    assert point.cap_hit_share == pytest.approx(19 / 186)  # over decoded answers: a cached one never hit the cap
    assert point.failures == 11 and point.requests == 210
    assert point.to_json()["cap_hit_share"] == pytest.approx(19 / 186) and point.to_json()["decoded"] == 186


def test_read_failures_most_frequent_first(tmp_path: Path) -> None:
    path = tmp_path / "x_final_failures.csv"
    path.write_text(
        "Method,Name,Error,Occurrences\n"
        'POST,/users/[id]/events,"CatchResponseError(\'HTTP 401: {""error"": ""no key""}\')",3\n'
        "POST,/recommend [ved],CatchResponseError('HTTP 422: latency_ms'),40\n"
    )
    rows = read_failures(path)
    assert [(r.name, r.occurrences) for r in rows] == [("/recommend [ved]", 40), ("/users/[id]/events", 3)]
    assert 'HTTP 401: {"error": "no key"}' in rows[1].error
    assert read_failures(tmp_path / "absent_final_failures.csv") == []


def test_read_point_without_counts_or_with_bad_mode_fails(tmp_path: Path) -> None:
    prefix = write_point(tmp_path, "beam", 1, None, requests=5, failures=0, rps=5.0, p50=1, p95=2, p99=3)
    with pytest.raises(ValueError, match="no counts"):
        read_point(prefix, "beam", 1)
    with pytest.raises(ValueError, match="mode"):
        read_point(prefix, "greedy", 1)


def test_read_point_of_a_mode_without_requests_is_empty(tmp_path: Path) -> None:
    prefix = write_point(tmp_path, "beam", 1, {}, requests=5, failures=0, rps=5.0, p50=1, p95=2, p99=3)
    point = read_point(prefix, "ved", 1)  # the file only has beam rows
    assert point.recommend.requests == 0 and point.recommend.p50_ms is None and point.cap_hit_share == 0.0


@pytest.fixture
def points(tmp_path: Path) -> list[PointResult]:
    out = []
    for mode, users, p50 in [("ved", 8, 48), ("beam", 8, 20), ("beam", 1, 9), ("ved", 1, 30)]:
        ved = mode == "ved"
        counts = {"cap_hits": 25, "cached": 20, "fallbacks": 6, "popular": 4} if ved else {}
        extra = {mode: {"responses": 100, "ved_tokens": 0} | counts}
        prefix = write_point(
            tmp_path, mode, users, extra, requests=100, failures=0, rps=12.34, p50=p50, p95=p50 + 5, p99=p50 + 9
        )
        out.append(read_point(prefix, mode, users))
    return out


def test_markdown_table_orders_beam_then_ved_by_users(points: list[PointResult]) -> None:
    lines = markdown_table(points).strip().splitlines()
    assert lines[0] == (
        "| mode | users | requests | RPS | p50 ms | p95 ms | p99 ms | failures | cached | cap hits | fallbacks "
        "| event failures |"
    )
    body = [line.split("|")[1:3] for line in lines[2:]]
    assert [(m.strip(), u.strip()) for m, u in body] == [("beam", "1"), ("beam", "8"), ("ved", "1"), ("ved", "8")]
    # /recommend failures over /recommend requests, the events' own (1 of 10) apart
    assert lines[2] == "| beam | 1 | 100 | 12.3 | 9 | 14 | 18 | 0 (0.0%) | 0 (0.0%) | 0 (0.0%) | 0 (0.0%) | 1 (10.0%) |"
    # 20 of 100 cached: cap hits and fallbacks over the 80 decoded
    assert lines[-1].endswith("| 20 (20.0%) | 25 (31.2%) | 10 (12.5%) | 1 (10.0%) |")


def test_plot_writes_a_png(points: list[PointResult], tmp_path: Path) -> None:
    out = tmp_path / "plots" / "latency.png"
    plot_latency(points, out, cap_ms=50, title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_copes_with_one_mode_and_missing_percentiles(points: list[PointResult], tmp_path: Path) -> None:
    out = tmp_path / "beam_only.png"
    plot_latency([p for p in points if p.mode == "beam"], out)
    assert out.exists()


def test_write_report_writes_table_plot_and_json(points: list[PointResult], tmp_path: Path) -> None:
    paths = write_report(points, tmp_path / "report", {"host": "http://127.0.0.1:8000"}, cap_ms=50)
    assert paths["table"].read_text() == markdown_table(points)
    data = json.loads(paths["json"].read_text())
    assert data["meta"]["host"] == "http://127.0.0.1:8000" and len(data["points"]) == 4
    assert paths["plot"].exists()


def test_a_report_that_fails_midway_leaves_the_earlier_one_whole(
    points: list[PointResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file is replaced in one rename: a plot that fails after writing part of its PNG (a full disk, a kill)
    leaves the earlier plot readable, not a truncated one, and no temporary file beside it."""
    from matplotlib.figure import Figure

    out = tmp_path / "report"
    paths = write_report(points, out, {}, cap_ms=50)
    before = {name: path.read_bytes() for name, path in paths.items()}

    def fail_midway(self: Figure, target: object, **kwargs: object) -> None:
        if isinstance(target, (str, Path)):
            Path(target).write_bytes(b"\x89PNG half")
        else:
            target.write(b"\x89PNG half")  # type: ignore[attr-defined]
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", fail_midway)
    with pytest.raises(OSError, match="No space"):
        write_report(points[:2], out, {}, cap_ms=50)
    assert paths["plot"].read_bytes() == before["plot"]
    assert sorted(p.name for p in out.iterdir()) == ["latency.png", "results.json", "table.md"]
