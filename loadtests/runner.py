"""``vstar loadtest``: headless locust runs for beam and VED at several user counts.

Each point (mode, users) is its own ``locust --headless`` subprocess with one
user class, all users spawned at once and the statistics reset once they are
up, so a point measures steady closed-loop load at that concurrency. Locust
runs in a child process because it monkey-patches with gevent on import; this
process only plans, waits and reports (``loadtests.results``).

Bounded: every point runs ``duration_s`` (at most ``MAX_DURATION_S``) and is
killed at ``duration_s + GRACE_S``; the whole plan's length is known up front.
Only loopback hosts are accepted (``loadtests.target``), the whole split is read
once here (a bad row is named before the server is waited for), and the server
must answer ``/readyz`` before any load is sent. A point that fails (locust's
exit status, no report, no request at all: users that failed to start, or more
than half of its ``/recommend`` requests or of its event posts failed, each
error naming the failure locust saw most often) stops the plan, and the points
measured before it are written as the report.

``--out`` always holds one whole run's files, the old run's or the new one's:
the run writes into a staging folder beside it (``models.atomic_folder``) and
publishes that onto ``--out`` in one step when it ends. An ``--out`` that
holds an earlier report is refused before the server is waited for unless
``force`` (``--force``), and one that holds files no run wrote is refused even
then, since publishing replaces the folder whole; so is a mount point (a
volume), which no rename can replace. An earlier report that a publish killed
between its two renames left set aside (``atomic_folder.put_back``) is put back
first, so it is checked, and kept, as any. A failed point or an interrupt (Ctrl-C)
cuts the run short, and the points measured before it are published as a report
that says so: onto ``--out`` when it held no earlier report, else into a new
folder beside it (``<out>.partial-<UTC time>``, never removed by a later run),
since a cut-short run never replaces a whole earlier one, ``--force`` or not. A
run cut short before its first point leaves ``--out`` as it was; after a failed
point its staging folder stays beside ``--out`` for the point's log, which the
error names, and the next run to that ``--out`` removes it. A report that cannot
be written or published (a full disk) leaves ``--out`` as it was and the staging
folder, with the points' raw files, beside it, named in the error. Any other
error removes the staging folder and leaves ``--out`` as it was.

The API key for event posts (``--api-key``, or ``VSTAR_LT_API_KEY``) reaches
the locust children through their environment, never their command line, and
is not written into the report. It is the only ``VSTAR_LT_*`` variable they
get: the locustfile reads those for the flags the plan leaves unset, so one
exported for a plain locust run or the compose profile would change what is
sent behind the plan's back. Answers read from the service's response
cache are counted per point; when there were any, the run ends with a warning:
their latency is a cache read's, not a decode's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import httpx

from loadtests.histories import read_histories, split_path
from loadtests.request_names import EVENT_NAME, recommend_name
from loadtests.results import MODES, PointResult, read_failures, read_point, report_entries, write_report
from loadtests.target import require_loopback
from models.atomic_folder import publish, put_back, staging_folder
from models.output_path import replaced_folder_problem

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
USER_CLASSES = {"beam": "BeamUser", "ved": "VedUser"}
MAX_DURATION_S = 600
GRACE_S = 30  # locust start-up plus --stop-timeout, before a point is killed
MAX_USERS = 1024
_DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")


def parse_duration(text: str) -> int:
    """Seconds in ``"30s"``, ``"2m"``, ``"1m30s"`` or ``"45"`` (locust's spellings)."""
    match = _DURATION_RE.match(text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"--duration must look like 30s, 2m or 1m30s, got {text!r}")
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_users(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``, sorted and without repeats."""
    try:
        counts = sorted({int(part) for part in text.split(",")})  # an empty entry too: int("") refuses it
    except ValueError:
        raise ValueError(f"--users must be a comma list of integers, got {text!r}") from None
    if not counts or counts[0] < 1 or counts[-1] > MAX_USERS:
        raise ValueError(f"--users must list counts in 1..{MAX_USERS}, got {text!r}")
    return tuple(counts)


@dataclass(frozen=True)
class LoadTestPlan:
    host: str  # base URL of the service, loopback only
    data: Path  # data set folder; histories come from <data>/<split>.csv
    out: Path
    users: tuple[int, ...] = (1, 8, 32)
    modes: tuple[str, ...] = MODES
    duration_s: int = 30  # per point, after all users are up
    k: int = 10
    budget: int | None = None  # VED tokens; None = the server's default
    latency_ms: int | None = None  # VED cap; None = the server's default
    event_share: float = 0.1  # share of user tasks that post an event instead of asking
    exclude_history: bool = False
    split: str = "test"
    seed: int = 0
    api_key: str = field(default="", repr=False)  # X-API-Key of the event posts; passed by environment, not reported
    extra_locust_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 1 <= self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"--duration must be 1..{MAX_DURATION_S} s per point, got {self.duration_s} s")
        if not self.users or min(self.users) < 1:
            raise ValueError(f"--users must be positive counts, got {self.users}")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ValueError(
                f"--modes must name some of {', '.join(MODES)} (a comma list), got {','.join(self.modes) or 'none'}"
            )
        if any(v is not None and v < 1 for v in (self.k, self.budget, self.latency_ms)):
            raise ValueError("--k, --budget and --latency-ms must be positive")
        if not 0.0 <= self.event_share <= 1.0:
            raise ValueError(f"--event-share must lie in [0, 1], got {self.event_share}")

    @property
    def points(self) -> list[tuple[str, int]]:
        return [(mode, users) for mode in self.modes for users in self.users]

    @property
    def max_seconds(self) -> int:
        """Upper bound of the whole plan's wall time."""
        return len(self.points) * (self.duration_s + GRACE_S)


def locust_command(plan: LoadTestPlan, mode: str, users: int, prefix: Path) -> list[str]:
    """The headless locust invocation for one point."""
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", plan.host, "--users", str(users), "--spawn-rate", str(users), "--reset-stats",
        "--run-time", f"{plan.duration_s}s", "--stop-timeout", "5", "--exit-code-on-error", "0",
        "--csv", str(prefix), "--loglevel", "WARNING", "--vstar-report", str(prefix),
        "--vstar-data", str(plan.data), "--vstar-split", plan.split, "--vstar-k", str(plan.k),
        "--vstar-event-share", str(plan.event_share), "--vstar-seed", str(plan.seed),
    ]  # fmt: skip
    if plan.budget is not None:
        command += ["--vstar-budget", str(plan.budget)]
    if plan.latency_ms is not None:
        command += ["--vstar-latency-ms", str(plan.latency_ms)]
    if plan.exclude_history:
        command.append("--vstar-exclude-history")
    return [*command, *plan.extra_locust_args, USER_CLASSES[mode]]


def out_problem(out: Path, force: bool) -> str | None:
    """What stops a run from publishing its files onto ``out`` (a sentence), or None: a new or empty folder, or
    with ``force`` one that holds an earlier report and nothing else (the run replaces the folder whole)."""
    problem = replaced_folder_problem(out)  # a volume (docker run -v) too: the swap would fail after every point
    if problem is not None:
        return problem
    ours, others = report_entries(out)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        return (f"{out} holds files that vstar loadtest does not write ({shown}), which its report would replace: "
                "give another --out (a new or empty folder)")  # fmt: skip
    if ours and not force:
        shown = ", ".join(f"{n}/" if n == "raw" else n for n in ours)
        return (f"{out} holds an earlier run's results ({shown}): pass --force to replace them with a whole run's "
                f"(a run cut short leaves them and publishes its points in {out.resolve().name}.partial-<UTC start> "
                "beside them), or give another --out")  # fmt: skip
    return None


class PointFailed(RuntimeError):
    """A point that measured nothing: ``what`` went wrong, and ``log`` is its locust log."""

    def __init__(self, what: str, log: Path) -> None:
        super().__init__(f"{what}; see {log}")
        self.what, self.log = what, log


def wait_ready(host: str, timeout_s: float = 60.0) -> None:
    """Poll ``/readyz`` until it answers 200 (a server still loading its model refuses connections for a while);
    ``RuntimeError`` with the last answer otherwise."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{host}/readyz", timeout=2.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise RuntimeError(
        f"{host}/readyz not ready after {timeout_s:.0f} s ({last}); start `vstar serve` there first, or give "
        "--host the URL it listens on"
    )


MOST_FAILURES = 0.5  # a point whose requests failed more often than this measures no service
MIN_EVENT_FAILURES = 5  # ... of its event posts, once it made this many failed ones (a short point posts few)


def most_failures(stem: Path, name: str) -> str:
    """The failure locust saw most often for request ``name`` in one point, for an error message."""
    rows = [r for r in read_failures(stem.with_name(stem.name + "_final_failures.csv")) if r.name == name]
    return f"most often ({rows[0].occurrences} times): {rows[0].error[:300]}" if rows else "no failure recorded"


def child_environment(plan: LoadTestPlan) -> dict[str, str]:
    """This process's environment without the locustfile's ``VSTAR_LT_*`` variables, which it reads for every flag
    left unset (a cap exported for the compose profile would reach a plan that leaves the cap to the server), plus
    the plan's API key: the plan alone says what is sent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSTAR_LT_")}
    return env | ({"VSTAR_LT_API_KEY": plan.api_key} if plan.api_key else {})


def run_point(plan: LoadTestPlan, mode: str, users: int) -> PointResult:
    """One locust run; its CSV, counts and log stay under ``<out>/raw``."""
    raw = plan.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    stem = raw / f"{mode}_u{users}"
    for stale in raw.glob(f"{stem.name}_*"):
        stale.unlink()
    log = stem.with_name(stem.name + ".log")
    limit = plan.duration_s + GRACE_S
    env = child_environment(plan)
    with log.open("w") as log_file:
        try:
            proc = subprocess.run(
                locust_command(plan, mode, users, stem), stdout=log_file, stderr=subprocess.STDOUT,
                timeout=limit, check=False, env=env,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise PointFailed(f"locust ran past {limit} s for {mode} at {users} users and was killed", log) from None
    if proc.returncode != 0:
        raise PointFailed(f"locust exited {proc.returncode} for {mode} at {users} users", log)
    try:
        point = read_point(stem, mode, users)
    except ValueError as e:
        raise PointFailed(f"{mode} at {users} users left no usable report ({e})", log) from None
    if point.requests == 0:  # its users failed before their first request: not a measurement of 0 RPS
        raise PointFailed(f"{mode} at {users} users sent no request (its users failed to start?)", log)
    failed, sent = point.recommend.failures, point.recommend.requests
    if failed > MOST_FAILURES * sent:  # e.g. a server that died mid-run: fast refusals, no measurement of it
        raise PointFailed(f"{mode} at {users} users: {failed} of {sent} /recommend requests failed, "
                          f"{most_failures(stem, recommend_name(mode))}", log)  # fmt: skip
    events = point.events
    if (
        events is not None
        and events.failures >= MIN_EVENT_FAILURES
        and events.failures > MOST_FAILURES * events.requests
    ):
        # e.g. a server with API keys and no --api-key: every post a fast 401, and no user_id read ever sent
        raise PointFailed(
            f"{mode} at {users} users: {events.failures} of {events.requests} event posts failed, "
            f"{most_failures(stem, EVENT_NAME)} (a server with VSTAR_API_KEYS needs --api-key or VSTAR_LT_API_KEY; "
            "--event-share 0 sends none)",
            log,
        )
    return point


def run_plan(
    plan: LoadTestPlan, echo: Callable[[str], None] = print, force: bool = False
) -> tuple[list[PointResult], dict[str, Path]]:
    """Every point of the plan in order, then the table, plot and JSON: written into a staging folder and
    published onto ``plan.out`` (module doc); ``force`` lets them replace an earlier run's there."""
    put_back(plan.out.resolve())  # a publish killed between its two renames: the earlier report, where it is looked for
    problem = out_problem(plan.out, force)
    if problem is not None:
        raise ValueError(f"--out: {problem}")
    plan = replace(plan, host=require_loopback(plan.host))
    # the whole split, as every child reads it: a bad row fails here, not as a point of children that never started
    read_histories(split_path(plan.data, plan.split))
    wait_ready(plan.host)
    echo(f"{len(plan.points)} points of {plan.duration_s} s, at most {plan.max_seconds} s in all")
    now = datetime.now(UTC)
    started = now.isoformat(timespec="seconds")
    target = plan.out.resolve()  # a link to a folder stays one: the folder it names is replaced
    # a run cut short never replaces a whole earlier report (--force or not): its points go beside it
    cut_out = partial_out(target, now) if report_entries(target)[0] else plan.out
    staged = staging_folder(target)
    points: list[PointResult] = []
    try:
        for mode, users in plan.points:
            point = run_point(replace(plan, out=staged), mode, users)
            r = point.recommend
            echo(
                f"{mode:>4} users={users:<4} rps={r.rps:8.1f} p50={r.p50_ms} p99={r.p99_ms} failures={r.failures} "
                f"cached={point.cached} event_failures={point.events.failures if point.events else 0}"
            )
            points.append(point)
    except PointFailed as e:
        if not points:  # --out keeps what it held; the staging folder keeps the log the error names
            raise RuntimeError(f"{e} ({plan.out} is left as it was)") from None
        paths = _publish(plan, points, started, staged, cut_out)  # the points measured so far are not lost
        log = cut_out / e.log.relative_to(staged)
        raise RuntimeError(
            f"{e.what}; see {log} (the {len(points)} points measured before it are in {paths['table']}"
            f"{_kept(plan.out, cut_out)})"
        ) from None
    except KeyboardInterrupt:  # as a failed point: the points measured before it are kept, published
        if points:
            paths = _publish(plan, points, started, staged, cut_out)
            echo(f"interrupted: the {len(points)} points measured before it are in {paths['table']}"
                 f"{_kept(plan.out, cut_out)}")  # fmt: skip
        else:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    cached, responses = sum(p.cached for p in points), sum(p.responses for p in points)
    if cached:
        echo(
            f"warning: {cached} of {responses} answers came from the service's response cache, so their latency is "
            "a cache read's, not a decode's (each point draws the same histories); to compare the decoders, serve "
            "with VSTAR_CACHE_TTL_S=0"
        )
    return points, _publish(plan, points, started, staged, plan.out)


def partial_out(out: Path, now: datetime) -> Path:
    """A new folder beside ``out`` (resolved: on the staging folder's file system) for the report of a run cut
    short over an earlier report: ``<out>.partial-`` and the run's start in UTC (a second one that second counts
    on)."""
    stem = f"{out.name}.partial-{now.strftime('%Y%m%dT%H%M%SZ')}"
    candidates = (out.with_name(stem if n == 0 else f"{stem}-{n}") for n in range(1_000_000))
    return next(c for c in candidates if not os.path.lexists(c))


def _kept(out: Path, cut_out: Path) -> str:
    """What a run cut short says of ``--out`` when its points went elsewhere."""
    return "" if cut_out == out else f"; {out} keeps the earlier run's results"


def _publish(plan: LoadTestPlan, points: list[PointResult], started: str, staged: Path, onto: Path) -> dict[str, Path]:
    """``write_report`` of ``points`` into ``staged`` beside the points' raw files, with the plan as metadata (a
    run cut short says so in its title), then ``staged`` published onto ``onto`` (``plan.out``, or the folder
    beside it for a run cut short over an earlier report); the report's paths under ``onto``."""
    cut = "" if len(points) == len(plan.points) else f", {len(points)} of {len(plan.points)} points: cut short"
    meta = {k: v for k, v in asdict(plan).items() if k != "api_key"} | {
        "data": str(plan.data), "out": str(onto), "started": started, "locust": version("locust"),
        "title": f"/recommend latency vs concurrency (k={plan.k}, {plan.duration_s} s per point{cut})",
    }  # fmt: skip
    try:
        written = write_report(points, staged, json.loads(json.dumps(meta, default=str)), cap_ms=plan.latency_ms)
        publish(staged, onto.resolve())  # a link to a folder stays one: the folder it names is replaced
    except Exception as e:  # a full disk: the measurements stay where they are, named, and --out as it was
        raise RuntimeError(
            f"the report of the {len(points)} points measured could not be written or published ({e}); {plan.out} "
            f"is left as it was, and their raw files are in {staged} (the next run to that --out removes it)"
        ) from e
    return {key: onto / path.name for key, path in written.items()}
