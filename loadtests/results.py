"""Turning locust's CSV output into the beam-vs-VED table and plot.

Each measured point (one mode at one user count) is one headless locust run
whose locustfile wrote, on quit, ``PREFIX_final_stats.csv`` (locust's own
``_stats.csv`` format), ``PREFIX_final_failures.csv`` (locust's
``_failures.csv``: each distinct failure and how often) and ``PREFIX_extra.json``,
the counts locust has no column for (responses, cap hits, cached answers, VED
fallbacks, VED tokens). This module reads them into ``PointResult`` rows and
renders them; it knows nothing of processes or HTTP, so its tests feed it
synthetic CSV text.

Shares have the denominator they are about: ``/recommend`` failures over
``/recommend`` requests, event failures over event posts (kept apart: a
refused event post, a 401 for a missing key say, is a different problem from a
failed recommendation), cached answers over successful responses, and cap hits
and fallbacks over the responses that decoded (a cached answer decodes nothing,
and an answer that hit the cap is never cached). Locust counts a failed
request's time in the percentiles too, so a point with failures says so.

A run's files (``REPORT_FILES`` and ``raw/``) are the whole folder: the
runner writes them into a staging folder and publishes it onto ``--out`` in one
step (``models.atomic_folder``), so ``report_entries`` is how it tells an earlier
report (``--force`` replaces it) from files no run wrote (never replaced). Each
file is also written in one rename, so a direct ``write_report`` into a folder
that fails midway leaves the earlier file whole.

Locust reports percentiles in whole milliseconds, rounded to two significant
digits above 100 ms; the table shows them as locust gives them.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.request_names import EVENT_NAME, recommend_name
from models.atomic_folder import replacing_file, write_file

MODES = ("beam", "ved")
REPORT_FILES = ("table.md", "latency.png", "results.json")  # what ``write_report`` writes
RAW = "raw"  # locust's CSVs, counts and logs per point (``loadtests.runner.run_point``)
# the columns of locust's _stats.csv this module reads (locust 2.x names)
STATS_COLUMNS: tuple[str, ...] = ("Name", "Request Count", "Failure Count", "Requests/s", "Average Response Time")
STATS_COLUMNS += ("50%", "95%", "99%", "100%")


@dataclass(frozen=True)
class EndpointStats:
    """One row of locust's ``_stats.csv``; percentiles are None when the endpoint got no request."""

    name: str
    requests: int
    failures: int
    rps: float
    avg_ms: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@dataclass(frozen=True)
class PointResult:
    """One mode at one concurrency: the /recommend figures, the event figures and the cap-hit counts."""

    mode: str
    users: int
    recommend: EndpointStats
    events: EndpointStats | None
    responses: int  # successful /recommend responses the locustfile counted
    cap_hits: int
    cached: int  # answered from the service's response cache
    ved_tokens: int
    fallbacks: int = 0  # VED answers from the initial beam (the anytime fallback)
    popular: int = 0  # VED answers from popularity (the model could not make the cap)

    @property
    def failures(self) -> int:
        return self.recommend.failures + (self.events.failures if self.events else 0)

    @property
    def requests(self) -> int:
        return self.recommend.requests + (self.events.requests if self.events else 0)

    @property
    def decoded(self) -> int:
        """Successful responses the server decoded (not read from its response cache)."""
        return self.responses - self.cached

    @property
    def cap_hit_share(self) -> float:
        return self.cap_hits / self.decoded if self.decoded else 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"failures": self.failures, "decoded": self.decoded, "cap_hit_share": self.cap_hit_share}


@dataclass(frozen=True)
class Failure:
    """One row of locust's ``_failures.csv``: a request name, the error it got, and how often."""

    name: str
    error: str
    occurrences: int


def _number(text: str) -> float | None:
    """A locust CSV cell: a number, or None for ``N/A`` / empty."""
    text = text.strip()
    if text in ("", "N/A"):
        return None
    value = float(text)
    return None if math.isnan(value) else value


def read_stats_csv(path: Path) -> dict[str, EndpointStats]:
    """Rows of a locust ``_stats.csv`` by request name (``Aggregated`` included)."""
    if not path.is_file():
        raise ValueError(f"{path}: locust wrote no stats file (did the run start?)")
    out: dict[str, EndpointStats] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in STATS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a locust stats CSV, missing columns {missing}")
        for row in reader:
            out[row["Name"]] = EndpointStats(
                name=row["Name"],
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                rps=_number(row["Requests/s"]) or 0.0,
                avg_ms=_number(row["Average Response Time"]) or 0.0,
                p50_ms=_number(row["50%"]),
                p95_ms=_number(row["95%"]),
                p99_ms=_number(row["99%"]),
                max_ms=_number(row["100%"]),
            )
    return out


def read_failures(path: Path) -> list[Failure]:
    """Rows of a locust ``_failures.csv``, the most frequent first; none when the file is absent."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = [Failure(r["Name"], r["Error"], int(r["Occurrences"])) for r in csv.DictReader(f)]
    return sorted(rows, key=lambda r: -r.occurrences)


def read_point(prefix: Path, mode: str, users: int) -> PointResult:
    """Join one run's ``PREFIX_final_stats.csv`` with the locustfile's ``PREFIX_extra.json`` for ``mode``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rows = read_stats_csv(prefix.with_name(prefix.name + "_final_stats.csv"))
    extra_json = prefix.with_name(prefix.name + "_extra.json")
    name = recommend_name(mode)
    empty = EndpointStats(name, 0, 0, 0.0, 0.0, None, None, None, None)
    if not extra_json.is_file():
        raise ValueError(f"{extra_json}: the locustfile wrote no counts (was it run with --vstar-report?)")
    extra = json.loads(extra_json.read_text()).get(mode, {})
    return PointResult(
        mode=mode,
        users=users,
        recommend=rows.get(name, empty),
        events=rows.get(EVENT_NAME),
        responses=int(extra.get("responses", 0)),
        cap_hits=int(extra.get("cap_hits", 0)),
        cached=int(extra.get("cached", 0)),
        ved_tokens=int(extra.get("ved_tokens", 0)),
        fallbacks=int(extra.get("fallbacks", 0)),
        popular=int(extra.get("popular", 0)),
    )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _share(count: int, total: int) -> str:
    return f"{count} ({100.0 * count / total:.1f}%)" if total else str(count)


TABLE_HEADER = (
    "| mode | users | requests | RPS | p50 ms | p95 ms | p99 ms | failures | cached | cap hits | fallbacks "
    "| event failures |"
)


def markdown_table(points: list[PointResult]) -> str:
    """The beam-vs-VED table: /recommend throughput, latency and failures, cached answers, VED's cap hits and
    fallbacks (initial beam or popularity) over decoded answers, and the event posts' failures (module doc)."""
    lines = [TABLE_HEADER, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: (MODES.index(p.mode), p.users)):
        r, e = p.recommend, p.events
        lines.append(
            f"| {p.mode} | {p.users} | {r.requests} | {r.rps:.1f} "
            f"| {_ms(r.p50_ms)} | {_ms(r.p95_ms)} | {_ms(r.p99_ms)} | {_share(r.failures, r.requests)} "
            f"| {_share(p.cached, p.responses)} | {_share(p.cap_hits, p.decoded)} "
            f"| {_share(p.fallbacks + p.popular, p.decoded)} | {_share(e.failures, e.requests) if e else 'n/a'} |"
        )
    return "\n".join(lines) + "\n"


def plot_latency(points: list[PointResult], out: Path, cap_ms: float | None = None, title: str = "") -> None:
    """p50/p95/p99 of /recommend against concurrent users, beam and VED side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODES), figsize=(11, 4.2), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], MODES, strict=True):
        series = sorted((p for p in points if p.mode == mode), key=lambda p: p.users)
        users = [p.users for p in series]
        for label, key, style in (("p50", "p50_ms", "o-"), ("p95", "p95_ms", "s--"), ("p99", "p99_ms", "^:")):
            values = [getattr(p.recommend, key) for p in series]
            xs = [u for u, v in zip(users, values, strict=True) if v is not None]
            ax.plot(xs, [v for v in values if v is not None], style, label=label)
        if mode == "ved" and cap_ms:
            ax.axhline(cap_ms, color="grey", linewidth=1, linestyle="-.", label=f"cap {cap_ms:g} ms")
        if users:
            ax.set_xscale("log", base=2)
            ax.set_xticks(users, [str(u) for u in users])
        ax.set_title("beam search" if mode == "beam" else "VED (value-guided, capped)")
        ax.set_xlabel("concurrent users")
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("/recommend latency (ms)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing_file(out) as f:  # the earlier plot stays whole if this one fails midway
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)


def report_entries(folder: Path) -> tuple[list[str], list[str]]:
    """The names in ``folder`` that a run writes (``REPORT_FILES``, ``raw/``) and the others, each sorted; both
    empty for a folder that does not exist."""
    if not folder.is_dir():
        return [], []
    names = sorted(p.name for p in folder.iterdir())
    ours = [n for n in names if n in REPORT_FILES or (n == RAW and (folder / n).is_dir())]
    return ours, [n for n in names if n not in ours]


def write_report(
    points: list[PointResult], out_dir: Path, meta: dict[str, Any], cap_ms: float | None = None
) -> dict[str, Path]:
    """``table.md``, ``latency.png`` and ``results.json`` (meta + every point) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {key: out_dir / name for key, name in zip(("table", "plot", "json"), REPORT_FILES, strict=True)}
    write_file(paths["table"], markdown_table(points).encode())
    plot_latency(points, paths["plot"], cap_ms=cap_ms, title=str(meta.get("title", "")))
    report = json.dumps({"meta": meta, "points": [p.to_json() for p in points]}, indent=2) + "\n"
    write_file(paths["json"], report.encode())
    return paths
