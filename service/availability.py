"""Items a deployment no longer offers (``VSTAR_UNAVAILABLE_ITEMS``): never recommended, and no retraining.

The setting names a JSON file holding an array of the entries a request's ``exclude_items`` takes: item ids,
SID strings (every item of the SID) and ``{"external_id": ...}`` objects. It is read when the service (or
``vstar recommend``) starts, and the service reads it again when it changes (``watch``, every
``VSTAR_UNAVAILABLE_RELOAD_S``): stock comes and goes faster than a deployment restarts.

Design decisions:

* A SID whose every item is unavailable leaves the trie (``SidTrie``'s ``keep``): beam search and VED never
  reach it, so the answer is the search over the SIDs still offered, and however many SIDs go, no request
  widens its search for them (a request's ``exclude_items`` is filtered from a wider search instead, as its
  entries are few; ``VSTAR_MAX_REQUEST_EXCLUDE``).
* An unavailable item whose SID still names an offered one stays reachable by that SID and is dropped from its
  items when an answer is ranked, as a request's exclusions are; a request that excludes the
  rest of such a SID gets one more beam for it, as for any SID its exclusions empty, and one that excludes
  items of a SID out of the trie gets none (``offered_of``: what a request's exclusions are checked against,
  read for the SIDs they touch, so no request pays for the size of the set).
* The popularity list that answers a VED request past its cap holds the offered SIDs only.
* The response cache's key holds the set's digest: an answer cached under another set (a start with a new
  file, replicas that started with different files) is a miss, never served.
* An entry the catalog does not know is passed over (a list of discontinued items may hold some the model was
  never trained on); an entry that can name no item, or a file that is not such an array, stops the start
  with one line naming the file, as does a set that leaves no SID to recommend.
* A changed file (its inode, size or modification time; a file swapped in by a rename, as a Kubernetes
  ConfigMap's is, included) is read off the event loop and applied whole: the ranking's filter first, so an
  item newly listed is never served, not even from a search already under way on the old trie; then the trie,
  built off the model thread and swapped in on it between decodes; then the popularity list and the cache's
  key. A changed file that cannot be used is logged with the line the start would give and changes nothing:
  the set in force stays until a file that can be used replaces it (``vstar_unavailable_reloads_total``
  counts both outcomes). A file rewritten in place can be read half-written: it is refused, and read again
  when its writer's next write changes it; write the new file beside it and rename it over the old one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from models.sid_catalog import SidCatalog, parse_sid
from service.errors import InvalidInput, StartupError, validation_message
from service.history import counted_exclusions
from service.schemas import HistoryEntry

log = logging.getLogger("service.availability")

SETTING = "VSTAR_UNAVAILABLE_ITEMS"
_ENTRIES = TypeAdapter(list[HistoryEntry], config={"strict": True})


class UnavailableItemsError(StartupError, ValueError):
    """The unavailable items' file cannot be used: the start stops (the service's ``StartupError``; on the
    command line a ``ValueError``, one line)."""


@dataclass(frozen=True)
class Unavailable:
    """Items not offered: ``items`` all of them (the ranking drops them), ``kept_sids`` the SID indices the trie
    holds (None: every SID), ``offered_of`` the
    items still offered of each SID that holds an unavailable one (none: a SID out of the trie), ``digest`` of
    the set for the cache's key (None: nothing is unavailable); ``unknown``: the file's entries the catalog does
    not know, passed over (logged at start: a list in another id space would name none)."""

    items: frozenset[int] = frozenset()
    kept_sids: tuple[int, ...] | None = None
    offered_of: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    digest: str | None = None
    unknown: int = 0


def _fail(path: Path, why: str) -> UnavailableItemsError:
    return UnavailableItemsError(f"{SETTING}={path}: {why}")


def read_unavailable(path: Path | None, catalog: SidCatalog) -> Unavailable:
    """The unavailable items of the file at ``path`` against ``catalog`` (module doc); nothing for None."""
    if path is None:
        return Unavailable()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})") from None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"not JSON ({e})") from None
    if not isinstance(body, list):
        raise _fail(path, 'expected a JSON array of item ids, SID strings or {"external_id": ...} objects') from None
    try:
        entries = _ENTRIES.validate_python(body)
    except ValidationError as e:
        raise _fail(path, validation_message(e.errors())) from None
    try:
        items, unknown = counted_exclusions(catalog, entries, "entries")
    except InvalidInput as e:
        raise _fail(path, str(e)) from None
    index, sid_items = catalog.sid_index, catalog.items_of_sid
    offered_of = {
        s: tuple(i for i in sid_items[s] if i not in items) for s in {index[catalog.items[i].sid] for i in items}
    }
    dropped = {s for s, held in offered_of.items() if not held}
    if len(dropped) == len(catalog.sids):
        raise _fail(path, f"every one of the catalog's {len(catalog.sids):,} SIDs would be left without an item")
    kept = tuple(s for s in range(len(catalog.sids)) if s not in dropped) if dropped else None
    digest = hashlib.sha256(",".join(map(str, sorted(items))).encode()).hexdigest()[:16] if items else None
    return Unavailable(items, kept, offered_of, digest, unknown)


def popularity_order(
    catalog: SidCatalog, popular: Sequence[Sequence[Any]], kept_sids: Sequence[int] | None
) -> tuple[list[int], list[float]]:
    """Every SID index still offered (``kept_sids``; None: all) with a popularity log-probability, most popular
    first: a checkpoint's training-target counts (``popular_sids``: [SID string, count] pairs), add-half smoothed
    over the whole catalog. What a VED request past its cap is answered from."""
    counts: dict[int, int] = {}
    for sid, count in popular:
        idx = catalog.sid_index.get(tuple(parse_sid(sid)))
        if idx is not None:
            counts[idx] = counts.get(idx, 0) + int(count)
    n = len(catalog.sids)
    total = sum(counts.values()) + 0.5 * n
    order = sorted(range(n) if kept_sids is None else kept_sids, key=lambda i: (-counts.get(i, 0), i))
    return order, [math.log((counts.get(i, 0) + 0.5) / total) for i in order]


FileVersion = tuple[int, int, int] | None


def file_version(path: Path) -> FileVersion:
    """What tells that the file at ``path`` changed: (inode, size, modification time in ns); None when it cannot
    be read (gone: a change like any other)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


async def watch(
    path: Path,
    every_s: float,
    catalog: SidCatalog,
    since: FileVersion,
    apply: Callable[[Unavailable], Awaitable[None]],
    refused: Callable[[UnavailableItemsError], None],
) -> None:
    """Until cancelled: every ``every_s`` seconds, the file at ``path`` read again when its version differs from
    the last one seen (``since``: the one read at start) and handed to ``apply``, or, when it cannot be used, its
    error to ``refused`` (module doc). The read runs in a worker thread: a large file does not hold the loop."""
    while True:
        await asyncio.sleep(every_s)
        version = file_version(path)
        if version == since:
            continue
        since = version
        try:
            new = await asyncio.to_thread(read_unavailable, path, catalog)
        except UnavailableItemsError as e:
            refused(e)
            continue
        try:
            await apply(new)
        except Exception:  # a background task that died would leave every later change unread, silently
            log.exception("%s=%s: applying the changed file failed; the next change is read again", SETTING, path)
