"""The load-test plan, locust command line, history reader and loopback guard (no locust run)."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from loadtests import runner
from loadtests.histories import HistorySampler, read_histories, split_path
from loadtests.runner import GRACE_S, LoadTestPlan, locust_command, parse_duration, parse_users, run_plan, run_point
from loadtests.target import require_loopback
from training.data.dataset import RecDataset


@pytest.fixture(autouse=True, scope="module")
def font_cache() -> None:
    """matplotlib lists the system's fonts by ``subprocess`` the first time a process loads its font manager; done
    here, before a test stands a fake locust in for ``subprocess.run`` (a report draws a plot), whose answer has no
    output: run alone in a fresh environment, the report's plot failed on it."""
    import matplotlib.font_manager  # noqa: F401


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("45", 45), ("2m", 120), ("1m30s", 90), ("1h", 3600)])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10ms", "-5s", "1.5s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="^--duration must look like 30s"):
        parse_duration(text)


def test_parse_users_sorts_and_dedupes() -> None:
    assert parse_users("32, 1,8,8") == (1, 8, 32)
    for bad in ("", "0,8", "a,b", "5000", "1,,8", "1,8,"):  # an empty entry is a slip, not a shorter list
        with pytest.raises(ValueError, match="--users"):
            parse_users(bad)


def plan(**overrides: object) -> LoadTestPlan:
    base: dict = {"host": "http://127.0.0.1:8000", "data": Path("/d"), "out": Path("/o")}
    return LoadTestPlan(**(base | overrides))


def test_plan_points_and_time_bound() -> None:
    p = plan(users=(1, 8), duration_s=20)
    assert p.points == [("beam", 1), ("beam", 8), ("ved", 1), ("ved", 8)]
    assert p.max_seconds == 4 * (20 + GRACE_S)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"duration_s": 0}, "^--duration must be 1"), ({"duration_s": 3600}, "^--duration must be 1"),
     ({"modes": ("greedy",)}, r"^--modes must name some of beam, ved \(a comma list\), got greedy$"),
     ({"modes": ()}, "^--modes must name some of beam, ved .*got none$"),
     ({"k": 0}, "^--k, --budget and --latency-ms must be positive"), ({"budget": 0}, "^--k, --budget"),
     ({"latency_ms": 0}, "^--k, --budget"), ({"event_share": 1.5}, r"^--event-share must lie in \[0, 1\]"),
     ({"users": ()}, "^--users must be positive counts"), ({"users": (0,)}, "^--users must be positive counts")],
)  # fmt: skip
def test_plan_rejects_bad_values(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(**overrides)


def test_locust_command_for_a_ved_point() -> None:
    p = plan(users=(8,), budget=400, latency_ms=50, exclude_history=True)
    cmd = locust_command(p, "ved", 8, Path("/o/raw/ved_u8"))
    assert cmd[1:3] == ["-m", "locust"] and cmd[-1] == "VedUser"
    flags = dict(zip(cmd[3:-1:1], cmd[4:], strict=False))
    assert flags["--users"] == "8" and flags["--spawn-rate"] == "8" and flags["--run-time"] == "30s"
    assert flags["--host"] == "http://127.0.0.1:8000" and flags["--vstar-report"] == "/o/raw/ved_u8"
    assert flags["--vstar-budget"] == "400" and flags["--vstar-latency-ms"] == "50"
    assert "--headless" in cmd and "--reset-stats" in cmd and "--vstar-exclude-history" in cmd


def test_locust_command_leaves_server_defaults_alone() -> None:
    cmd = locust_command(plan(), "beam", 1, Path("/o/raw/beam_u1"))
    assert cmd[-1] == "BeamUser"
    assert "--vstar-budget" not in cmd and "--vstar-latency-ms" not in cmd and "--vstar-exclude-history" not in cmd


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://127.0.0.2:80/", "http://localhost:8000", "http://[::1]:8000"]
)
def test_loopback_hosts_pass(url: str) -> None:
    assert require_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize(
    "url", ["http://10.0.0.5:8000", "http://192.168.1.1", "https://8.8.8.8", "http://[2001:db8::1]:80"]
)
def test_other_hosts_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        require_loopback(url)


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://127.0.0.1", "http://"])
def test_malformed_hosts_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        require_loopback(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc", "http://127.0.0.1:99999"])
def test_a_port_that_is_not_one_is_refused(url: str) -> None:
    """httpx raised InvalidURL at the first request, which no handler turned into one line."""
    with pytest.raises(ValueError, match="the port must be a number 0-65535"):
        require_loopback(url)


def test_read_histories_matches_load_dataset(tiny_data_dir: Path, tiny_dataset: RecDataset) -> None:
    rows = read_histories(split_path(tiny_data_dir, "test"))
    expected = [s for s in tiny_dataset.splits["test"] if s.history]
    assert [(r.user_id, r.item_ids, r.target) for r in rows] == [(s.user_id, s.history, s.target) for s in expected]
    catalog = tiny_dataset.catalog
    assert all(r.sids == tuple("".join(catalog.sid_of(i)) for i in r.item_ids) for r in rows)
    assert len(read_histories(split_path(tiny_data_dir, "test"), limit=3)) == 3


def test_read_histories_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        read_histories(tmp_path / "test.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,history_item_id,history_item_sid,item_id\nu1,[1,2,\"['<a_1>']\",3\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2"):
        read_histories(bad)
    short = tmp_path / "short.csv"
    short.write_text("user_id,item_id\nu1,3\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_histories(short)


def test_sampler_streams_repeat_per_user_and_differ_between_users(tiny_data_dir: Path) -> None:
    sampler = HistorySampler(read_histories(split_path(tiny_data_dir, "test")), seed=7)
    first = [sampler.draw(sampler.stream(0)) for _ in range(1)]
    a, b, c = sampler.stream(0), sampler.stream(0), sampler.stream(1)
    draws_a = [sampler.draw(a) for _ in range(20)]
    assert draws_a == [sampler.draw(b) for _ in range(20)]
    assert draws_a != [sampler.draw(c) for _ in range(20)]
    assert first[0] == draws_a[0]


def test_read_histories_names_the_line_of_an_item_id_that_is_no_integer(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,history_item_id,history_item_sid,item_id\nu1,[1],\"['<a_1>']\",3\nu2,[1],\"['<a_1>']\",x\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: item id 'x' is not an integer"):
        read_histories(bad)


def fake_locust(
    requests: int, failures: int = 0, events: tuple[int, int] = (0, 0), cached: int = 0, seen: list | None = None
) -> Callable[..., subprocess.CompletedProcess]:
    """``subprocess.run`` for a locust point that exits 0 having written its report with ``requests`` requests,
    ``failures`` of them failed (an HTTP 503 each), ``events`` = (posts, failed: an HTTP 401 each) and ``cached``
    answers from the response cache; ``seen`` collects each call's command and environment."""

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        if seen is not None:
            seen.append((command, kwargs.get("env")))
        prefix = Path(command[command.index("--vstar-report") + 1])
        mode = "ved" if command[-1] == "VedUser" else "beam"
        rows = [f"POST,/recommend [{mode}],{requests},{failures},5,5.0,1,9,400.0,10.0,0.0" + ",5" * 11] * bool(requests)
        rows += [f"POST,/users/[id]/events,{events[0]},{events[1]},2,2.0,1,3,40.0,1.0,0.0" + ",2" * 11] * bool(
            events[0]
        )
        prefix.with_name(prefix.name + "_final_stats.csv").write_text("\n".join([STATS_HEADER, *rows]) + "\n")
        failed = [f"POST,/recommend [{mode}],CatchResponseError('HTTP 503: not ready'),{failures}"] * bool(failures)
        failed += [f"POST,/users/[id]/events,CatchResponseError('HTTP 401: no API key'),{events[1]}"] * bool(events[1])
        text = "\n".join(["Method,Name,Error,Occurrences", *failed]) + "\n"
        prefix.with_name(prefix.name + "_final_failures.csv").write_text(text)
        extra = {mode: {"responses": requests - failures, "cached": cached}}
        prefix.with_name(prefix.name + "_extra.json").write_text(json.dumps(extra))
        return subprocess.CompletedProcess(command, 0)

    return run


def locust_failing_after(points: int, interrupt: bool = False) -> Callable[..., subprocess.CompletedProcess]:
    """``subprocess.run`` for a plan whose first ``points`` points each measure 7 requests (``fake_locust``) and
    whose next one fails (locust exits 1) or, with ``interrupt``, is stopped by Ctrl-C."""
    measured, calls = fake_locust(7), 0

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        nonlocal calls
        calls += 1
        if calls <= points:
            return measured(command, **kwargs)
        if interrupt:
            raise KeyboardInterrupt
        return subprocess.CompletedProcess(command, 1)

    return run


STATS_HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
    "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)


def test_a_point_whose_users_sent_nothing_is_an_error_not_a_row_of_zeros(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Users that failed to start (the locustfile's listener raised) leave an empty report and locust exits 0."""
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(0))
    with pytest.raises(RuntimeError, match="beam at 1 users sent no request"):
        run_point(plan(out=tmp_path), "beam", 1)
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(7))
    assert run_point(plan(out=tmp_path), "beam", 1).recommend.requests == 7


def test_a_point_whose_requests_mostly_failed_is_an_error_not_a_fast_row(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A server that died mid-run refuses connections at once: thousands of 'requests' a second, locust exits 0."""
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(3908, failures=3700))
    with pytest.raises(
        RuntimeError,
        match=r"beam at 2 users: 3700 of 3908 /recommend requests failed, most often \(3700 times\): "
        r"CatchResponseError\('HTTP 503: not ready'\); see ",
    ):
        run_point(plan(out=tmp_path), "beam", 2)
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(100, failures=50))  # half: still a measurement
    assert run_point(plan(out=tmp_path), "beam", 2).recommend.failures == 50


def test_a_failed_point_keeps_the_points_measured_before_it(
    monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, tmp_path: Path
) -> None:
    monkeypatch.setattr(runner.subprocess, "run", locust_failing_after(1))  # the second point's locust fails
    monkeypatch.setattr(runner, "wait_ready", lambda host: None)
    out = tmp_path / "lt"
    with pytest.raises(RuntimeError, match=r"locust exited 1 for ved at 1 users.*the 1 points measured before it") as e:
        run_plan(plan(data=tiny_data_dir, out=out, users=(1,)), echo=lambda _: None)
    assert str(e.value).endswith(f"are in {out / 'table.md'})")  # onto --out, which held nothing to keep
    log = Path(str(e.value).split("; see ")[1].split(" (")[0])
    assert log == out / "raw" / "ved_u1.log" and log.is_file()  # named where it was published
    assert "| beam | 1 | 7 |" in (out / "table.md").read_text()
    report = json.loads((out / "results.json").read_text())
    assert len(report["points"]) == 1 and "cut short" in report["meta"]["title"] and report["meta"]["out"] == str(out)
    assert [p.name for p in tmp_path.iterdir()] == ["lt"]


def test_a_point_whose_event_posts_mostly_failed_names_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A server with API keys and no key given: every event post a fast 401, and no user_id read ever sent."""
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(100, events=(12, 12)))
    with pytest.raises(
        RuntimeError,
        match=r"ved at 1 users: 12 of 12 event posts failed, most often \(12 times\): .*HTTP 401.*--api-key",
    ):
        run_point(plan(out=tmp_path), "ved", 1)
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(100, events=(12, 6)))  # half: still a measurement
    assert run_point(plan(out=tmp_path), "ved", 1).events.failures == 6  # type: ignore[union-attr]
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(100, events=(4, 4)))  # too few posts to judge by
    assert run_point(plan(out=tmp_path), "ved", 1).events.failures == 4  # type: ignore[union-attr]


def test_the_api_key_goes_by_environment_and_stays_out_of_the_report(
    monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, tmp_path: Path
) -> None:
    seen: list = []
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(7, seen=seen))
    monkeypatch.setattr(runner, "wait_ready", lambda host: None)
    out = tmp_path / "lt"
    run_plan(plan(data=tiny_data_dir, out=out, users=(1,), api_key="s3cret"), echo=lambda _: None)
    assert seen and all(env["VSTAR_LT_API_KEY"] == "s3cret" and "s3cret" not in cmd for cmd, env in seen)
    assert "s3cret" not in (out / "results.json").read_text() and "s3cret" not in repr(plan(api_key="s3cret"))


def test_cached_answers_are_counted_and_warned_of(
    monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, tmp_path: Path
) -> None:
    lines: list[str] = []
    monkeypatch.setattr(runner, "wait_ready", lambda host: None)
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(50, cached=20))
    points, paths = run_plan(plan(data=tiny_data_dir, out=tmp_path / "a", users=(1,)), echo=lines.append)
    assert [p.cached for p in points] == [20, 20] and "| 20 (40.0%) |" in paths["table"].read_text()
    assert lines[-1].startswith("warning: 40 of 100 answers came from the service's response cache")
    assert "VSTAR_CACHE_TTL_S=0" in lines[-1]
    lines.clear()
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(50))
    run_plan(plan(data=tiny_data_dir, out=tmp_path / "b", users=(1,)), echo=lines.append)
    assert not any(line.startswith("warning") for line in lines)


def test_locust_children_take_their_knobs_from_the_plan_alone(
    monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The locustfile reads every VSTAR_LT_* variable a flag leaves unset: a cap, budget or think time exported
    for the compose profile or a plain locust run would reach the children of a plan that leaves them to the
    server, and the report (its meta, the plot's cap line) would describe requests that were not sent."""
    for variable, value in [("VSTAR_LT_LATENCY_MS", "7"), ("VSTAR_LT_BUDGET", "9"), ("VSTAR_LT_THINK_MS", "500"),
                            ("VSTAR_LT_SID_SHARE", "1"), ("VSTAR_LT_EXCLUDE_HISTORY", "true"),
                            ("VSTAR_LT_API_KEY", "from-the-shell")]:  # fmt: skip
        monkeypatch.setenv(variable, value)
    seen: list = []
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(7, seen=seen))
    monkeypatch.setattr(runner, "wait_ready", lambda host: None)
    run_plan(plan(data=tiny_data_dir, out=tmp_path / "a", users=(1,)), echo=lambda _: None)
    run_plan(plan(data=tiny_data_dir, out=tmp_path / "b", users=(1,), api_key="k1"), echo=lambda _: None)
    assert len(seen) == 4
    assert all(not k.startswith("VSTAR_LT_") for _, env in seen[:2] for k in env)
    assert all([k for k in env if k.startswith("VSTAR_LT_")] == ["VSTAR_LT_API_KEY"] for _, env in seen[2:])
    assert all(env["VSTAR_LT_API_KEY"] == "k1" for _, env in seen[2:])


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, tmp_path: Path) -> Path:
    """An --out that holds a whole earlier run of 1 and 8 users, both modes (fake locust, no server)."""
    monkeypatch.setattr(runner, "wait_ready", lambda host: None)
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(9))
    out = tmp_path / "lt"
    run_plan(plan(data=tiny_data_dir, out=out, users=(1, 8)), echo=lambda _: None)
    assert {p.name for p in (out / "raw").iterdir()} >= {"beam_u8.log", "ved_u8_final_stats.csv"}
    return out


def test_an_earlier_report_is_refused_without_force_and_left_whole(earlier_run: Path, tiny_data_dir: Path) -> None:
    before = folder_bytes(earlier_run)
    refusal = (r"^--out: .*lt holds an earlier run's results \(latency\.png, raw/, results\.json, table\.md\): "
               r"pass --force to replace them with a whole run's \(a run cut short leaves them and publishes its "
               r"points in lt\.partial-<UTC start> beside them\), or give another --out$")  # fmt: skip
    with pytest.raises(ValueError, match=refusal):
        run_plan(plan(data=tiny_data_dir, out=earlier_run, users=(1,)), echo=lambda _: None)
    (earlier_run / "notes.txt").write_text("mine")  # a file no run writes: publishing would remove it
    with pytest.raises(ValueError, match=r"holds files that vstar loadtest does not write \(notes\.txt\)"):
        run_plan(plan(data=tiny_data_dir, out=earlier_run, users=(1,)), echo=lambda _: None, force=True)
    assert folder_bytes(earlier_run) == before | {"notes.txt": b"mine"}


def test_an_earlier_report_set_aside_by_a_killed_publish_is_put_back_and_refused(
    earlier_run: Path, tiny_data_dir: Path
) -> None:
    """A publish killed between its two renames (no RENAME_EXCHANGE) leaves the earlier report set aside and no
    --out: it is put back before --out is checked, so it needs --force as ever (and a run cut short goes beside it)."""
    before = folder_bytes(earlier_run)
    earlier_run.rename(earlier_run.with_name(f".{earlier_run.name}.old-0123abcd"))
    with pytest.raises(ValueError, match=r"holds an earlier run's results"):
        run_plan(plan(data=tiny_data_dir, out=earlier_run, users=(1,)), echo=lambda _: None)
    assert folder_bytes(earlier_run) == before and [p.name for p in earlier_run.parent.iterdir()] == ["lt"]


def test_a_forced_run_that_fails_at_its_first_point_leaves_the_earlier_results_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch, earlier_run: Path, tiny_data_dir: Path
) -> None:
    before = folder_bytes(earlier_run)
    monkeypatch.setattr(runner.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1))
    with pytest.raises(RuntimeError, match=r"locust exited 1 for beam at 1 users; see (\S+) \(.*lt is left as it was\)"
                       ) as failed:  # fmt: skip
        run_plan(plan(data=tiny_data_dir, out=earlier_run, users=(1,)), echo=lambda _: None, force=True)
    assert folder_bytes(earlier_run) == before
    log = Path(str(failed.value).split("; see ")[1].split(" (")[0])
    staged = log.parent.parent  # the staging folder beside --out, kept for the log the error names
    assert log.is_file() and staged.parent == earlier_run.parent and staged.name.startswith(".lt.tmp-")
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(7))
    run_plan(plan(data=tiny_data_dir, out=earlier_run, users=(1,)), echo=lambda _: None, force=True)
    assert [p.name for p in earlier_run.parent.iterdir()] == ["lt"]  # the next run to --out removed it


def test_a_forced_run_replaces_the_earlier_run_whole(
    monkeypatch: pytest.MonkeyPatch, earlier_run: Path, tiny_data_dir: Path
) -> None:
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(7))
    points, paths = run_plan(plan(data=tiny_data_dir, out=earlier_run, users=(1,)), echo=lambda _: None, force=True)
    assert [(p.mode, p.users, p.recommend.requests) for p in points] == [("beam", 1, 7), ("ved", 1, 7)]
    assert paths["table"] == earlier_run / "table.md" and "| beam | 1 | 7 |" in paths["table"].read_text()
    raw = {p.name for p in (earlier_run / "raw").iterdir()}
    assert raw and all(name.startswith(("beam_u1", "ved_u1")) for name in raw), raw  # no file of the 8-user points
    assert [p.name for p in earlier_run.parent.iterdir()] == ["lt"]  # no staging folder left beside it


def partial_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f"{out.name}.partial-"))


def test_a_cut_short_forced_run_keeps_the_earlier_report_and_publishes_its_points_beside_it(
    monkeypatch: pytest.MonkeyPatch, earlier_run: Path, tiny_data_dir: Path
) -> None:
    """--force replaces an earlier report with a whole run, not with the first point of one: a run that fails
    after minutes of load would otherwise leave one point where a complete run stood."""
    before = folder_bytes(earlier_run)
    monkeypatch.setattr(runner.subprocess, "run", locust_failing_after(1))
    with pytest.raises(RuntimeError, match=r"locust exited 1 for ved at 1 users; see (\S+) \(the 1 points") as failed:
        run_plan(plan(data=tiny_data_dir, out=earlier_run, users=(1,)), echo=lambda _: None, force=True)
    assert folder_bytes(earlier_run) == before
    [partial] = partial_folders(earlier_run)
    assert re.fullmatch(r"lt\.partial-\d{8}T\d{6}Z", partial.name), partial.name
    assert str(failed.value).endswith(f"are in {partial / 'table.md'}; {earlier_run} keeps the earlier run's results)")
    log = Path(str(failed.value).split("; see ")[1].split(" (")[0])
    assert log == partial / "raw" / "ved_u1.log" and log.is_file()
    report = json.loads((partial / "results.json").read_text())
    assert [(p["mode"], p["users"]) for p in report["points"]] == [("beam", 1)]
    assert "cut short" in report["meta"]["title"] and report["meta"]["out"] == str(partial)
    assert not [p for p in earlier_run.parent.iterdir() if p.name.startswith(f".{earlier_run.name}.")]
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(7))  # a later run to --out leaves the partial one
    run_plan(plan(data=tiny_data_dir, out=earlier_run, users=(1,)), echo=lambda _: None, force=True)
    assert partial_folders(earlier_run) == [partial] and folder_bytes(earlier_run) != before


def test_a_cut_short_run_through_a_link_publishes_beside_the_folder_it_names(
    monkeypatch: pytest.MonkeyPatch, earlier_run: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The partial report goes where the staging folder is, beside the linked folder (one file system: a rename
    publishes it), named after that folder; the link stays a link to the earlier report."""
    before = folder_bytes(earlier_run)
    link = tmp_path / "links" / "latest"
    link.parent.mkdir()
    link.symlink_to(earlier_run)
    monkeypatch.setattr(runner.subprocess, "run", locust_failing_after(1))
    with pytest.raises(RuntimeError, match=r"locust exited 1 for ved at 1 users") as failed:
        run_plan(plan(data=tiny_data_dir, out=link, users=(1,)), echo=lambda _: None, force=True)
    [partial] = partial_folders(earlier_run)
    assert str(failed.value).endswith(f"are in {partial / 'table.md'}; {link} keeps the earlier run's results)")
    assert link.is_symlink() and link.resolve() == earlier_run and folder_bytes(earlier_run) == before
    assert [p.name for p in link.parent.iterdir()] == ["latest"]


def test_ctrl_c_publishes_the_points_measured_before_it(
    monkeypatch: pytest.MonkeyPatch, earlier_run: Path, tiny_data_dir: Path
) -> None:
    """An interrupt is a point cut short: the points measured before it are a report (they took minutes), beside
    the earlier run's, which stays; an interrupt before the first point leaves everything as it was."""
    before = folder_bytes(earlier_run)
    monkeypatch.setattr(runner.subprocess, "run", locust_failing_after(1, interrupt=True))
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_plan(plan(data=tiny_data_dir, out=earlier_run, users=(1,)), echo=said.append, force=True)
    assert folder_bytes(earlier_run) == before
    [partial] = partial_folders(earlier_run)
    report = json.loads((partial / "results.json").read_text())
    assert [(p["mode"], p["users"]) for p in report["points"]] == [("beam", 1)] and "cut short" in report["meta"][
        "title"
    ]
    assert said[-1] == (f"interrupted: the 1 points measured before it are in {partial / 'table.md'}; "
                        f"{earlier_run} keeps the earlier run's results")  # fmt: skip
    assert not [p for p in earlier_run.parent.iterdir() if p.name.startswith(f".{earlier_run.name}.tmp-")]
    monkeypatch.setattr(runner.subprocess, "run", locust_failing_after(0, interrupt=True))  # at its first point
    with pytest.raises(KeyboardInterrupt):
        run_plan(plan(data=tiny_data_dir, out=earlier_run, users=(1,)), echo=said.append, force=True)
    assert folder_bytes(earlier_run) == before and partial_folders(earlier_run) == [partial]


def test_a_mount_point_out_is_refused_before_the_server_is_waited_for(
    monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A volume mounted at --out (``docker run -v ./lt:/lt ... --out /lt``): the staging folder beside it is on
    another file system, so publishing failed after every point was measured, and the measurements went with the
    staging folder. It is refused up front, as a folder holding other files is."""
    out = tmp_path / "lt"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p).resolve() == out.resolve() or real(p))

    def never(host: str) -> None:
        raise AssertionError("the server was waited for")

    monkeypatch.setattr(runner, "wait_ready", never)
    with pytest.raises(ValueError, match=r"^--out: .*lt is a mount point, which the new folder cannot replace"):
        run_plan(plan(data=tiny_data_dir, out=out, users=(1,)), echo=lambda _: None, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["lt"] and not any(out.iterdir())


def test_a_report_that_cannot_be_written_leaves_the_measurements_named(
    monkeypatch: pytest.MonkeyPatch, earlier_run: Path, tiny_data_dir: Path
) -> None:
    """A full disk at the report's write removed the staging folder, and with it every point's raw files, after
    minutes of load; they now stay beside --out, which is left as it was, and the error names them."""
    before = folder_bytes(earlier_run)
    monkeypatch.setattr(runner.subprocess, "run", fake_locust(7))

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "write_report", full)
    with pytest.raises(RuntimeError, match=r"the report of the 2 points measured could not be written") as failed:
        run_plan(plan(data=tiny_data_dir, out=earlier_run, users=(1,)), echo=lambda _: None, force=True)
    assert folder_bytes(earlier_run) == before
    staged = Path(str(failed.value).split("their raw files are in ")[1].split(" (")[0])
    assert staged.parent == earlier_run.parent and {p.name for p in (staged / "raw").iterdir()} >= {"ved_u1.log"}
