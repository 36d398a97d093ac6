"""Items a deployment no longer offers (``VSTAR_UNAVAILABLE_ITEMS``): never recommended, and no retraining.

The setting names a JSON file holding an array of the entries a request's ``exclude_items`` takes: item ids,
SID strings (every item of the SID) and ``{"external_id": ...}`` objects. It is read once, when the service
(or ``vstar recommend``) starts; a changed file takes effect at the next start.

Design decisions:

* A SID whose every item is unavailable leaves the trie (``SidTrie``'s ``keep``): beam search and VED never
  reach it, so the answer is the search over the SIDs still offered, and however many SIDs go, no request
  widens its search for them (a request's ``exclude_items`` is filtered from a wider search instead, as its
  entries are few; ``VSTAR_MAX_REQUEST_EXCLUDE``).
* An unavailable item whose SID still names an offered one stays reachable by that SID and is dropped from its
  items when an answer is ranked (``partial``), as a request's exclusions are; a request that excludes the
  rest of such a SID gets one more beam for it, as for any SID its exclusions empty, and one that excludes
  items of a SID out of the trie gets none (``offered_of``: what a request's exclusions are checked against,
  read for the SIDs they touch, so no request pays for the size of the set).
* The popularity list that answers a VED request past its cap holds the offered SIDs only.
* The response cache's key holds the set's digest: an answer cached under another set (a start with a new
  file, replicas that started with different files) is a miss, never served.
* An entry the catalog does not know is passed over (a list of discontinued items may hold some the model was
  never trained on); an entry that can name no item, or a file that is not such an array, stops the start
  with one line naming the file, as does a set that leaves no SID to recommend.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from models.sid_catalog import SidCatalog
from service.errors import InvalidInput, StartupError, validation_message
from service.history import counted_exclusions
from service.schemas import HistoryEntry

SETTING = "VSTAR_UNAVAILABLE_ITEMS"
_ENTRIES = TypeAdapter(list[HistoryEntry], config={"strict": True})


class UnavailableItemsError(StartupError, ValueError):
    """The unavailable items' file cannot be used: the start stops (the service's ``StartupError``; on the
    command line a ``ValueError``, one line)."""


@dataclass(frozen=True)
class Unavailable:
    """Items not offered: ``items`` all of them, ``partial`` those whose SID still names an offered item (the
    ranking drops them), ``kept_sids`` the SID indices the trie holds (None: every SID), ``offered_of`` the
    items still offered of each SID that holds an unavailable one (none: a SID out of the trie), ``digest`` of
    the set for the cache's key (None: nothing is unavailable); ``unknown``: the file's entries the catalog does
    not know, passed over (logged at start: a list in another id space would name none)."""

    items: frozenset[int] = frozenset()
    partial: frozenset[int] = frozenset()
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
    partial = frozenset(i for i in items if index[catalog.items[i].sid] not in dropped)
    digest = hashlib.sha256(",".join(map(str, sorted(items))).encode()).hexdigest()[:16] if items else None
    return Unavailable(items, partial, kept, offered_of, digest, unknown)
