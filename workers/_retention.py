"""Retention: which backups a prune keeps, and deleting the rest without breaking a chain.

Rules (any combination; a backup kept by any rule is kept) count only *complete, restorable*
backups, newest first, as restic and borg do: ``last N`` keeps the N newest; ``hourly``,
``daily``, ``weekly`` (ISO weeks), ``monthly N`` keep the newest backup of each of the last N
UTC periods that have one; ``within D`` keeps every backup taken less than D before now.
When the rules keep none, the newest restorable backup is kept anyway: no rule empties a
catalog. Two things are kept whatever the rules say: for a prefix whose newest attempt failed
(a partial backup), its newest complete copy and the backup that records the failure; and,
per prefix, every link a kept backup's chain needs.

A backup kept only as a link for some of its prefixes is *trimmed*: its manifest is rewritten
to hold just those (it becomes partial), then the other pieces are deleted. Everything else
goes: manifest-less directories of runs that died, invalid ones, partial ones, and complete
ones no rule keeps.

Deletion order makes a prune killed at any instant harmless: (1) newest first, each durably,
a trimmed backup's manifest is rewritten or a removed backup's manifest unlinked; a backup
depends only on older ones, so none is ever left naming a link that is gone; (2) then the
removed backups' files and directories go, and the pieces trims dropped. A backup a killed
prune did not finish is therefore complete and restorable, trimmed, or without a manifest,
and the next prune finishes the job. Only files hotcopy writes are deleted (manifests,
pieces, its temps); a directory holding anything else is left in place, and no link is ever
followed.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hotcopy.storage._faults import fault

from ._catalog import (
    COMPLETE,
    MANIFEST,
    UNFINISHED,
    Catalog,
    CatalogView,
    LockWait,
    Manifest,
    Record,
    iso_utc,
    parse_duration,
)
from ._logical import document_name

# How far ahead of this machine's clock another that backs up into the same catalog may be.
_CLOCK_SKEW = 24 * 3600.0

# The fault point between two steps of a prune's deletions (tests SIGKILL a prune there).
FAULT_POINT = "prune:step"

PERIODS: dict[str, Callable[[datetime], tuple[Any, str]]] = {
    "hourly": lambda t: ((t.year, t.month, t.day, t.hour), t.strftime("%Y-%m-%dT%Hh")),
    "daily": lambda t: ((t.year, t.month, t.day), t.strftime("%Y-%m-%d")),
    "weekly": lambda t: (t.isocalendar()[:2], t.strftime("%G-W%V")),
    "monthly": lambda t: ((t.year, t.month), t.strftime("%Y-%m")),
}


@dataclass(frozen=True)
class Rules:
    last: int | None = None
    hourly: int | None = None
    daily: int | None = None
    weekly: int | None = None
    monthly: int | None = None
    within: str | None = None  # a duration: 36h, 7d

    def __post_init__(self) -> None:
        for name in ("last", *PERIODS):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"keep-{name} must be a count >= 1, not {value!r}")
        if self.within is not None:
            parse_duration(self.within)
        if all(getattr(self, name) is None for name in ("last", *PERIODS, "within")):
            raise ValueError(
                "prune needs at least one rule: --keep-last N (or --keep N), --keep-hourly, "
                "--keep-daily, --keep-weekly, --keep-monthly N, or --keep-within DURATION"
            )


@dataclass
class Decision:
    id: str
    time: float
    action: str  # "keep", "trim" (kept as a link for some prefixes), "remove", "leave"
    reasons: list[str] = field(default_factory=list)
    keep_prefixes: set[str] = field(default_factory=set)  # for "trim"
    drop_prefixes: list[str] = field(default_factory=list)  # for "trim"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "time": iso_utc(self.time),
            "action": self.action,
            "reasons": self.reasons,
        }
        if self.action == "trim":
            data["drops"] = self.drop_prefixes
        return data


@dataclass
class PruneReport:
    decisions: list[Decision]  # every backup, oldest first
    dry_run: bool

    def ids(self, action: str) -> list[str]:
        return [d.id for d in self.decisions if d.action == action]

    @property
    def removed(self) -> list[str]:
        return self.ids("remove")

    @property
    def trimmed(self) -> list[str]:
        return self.ids("trim")

    @property
    def kept(self) -> list[str]:
        return self.ids("keep")

    @property
    def left(self) -> list[str]:
        return self.ids("leave")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "dry_run": self.dry_run,
            "backups": [decision.to_json() for decision in self.decisions],
            "removed": self.removed,
            "trimmed": self.trimmed,
            "kept": self.kept,
            "left": self.left,
        }


def plan(view: CatalogView, rules: Rules, now: float) -> list[Decision]:
    """What a prune does to each backup of ``view``, and why (nothing is changed here)."""
    records = view.ordered()
    eligible = [
        r for r in records if r.status == COMPLETE and view.restorable_problem(r.id) is None
    ]
    keep: dict[str, list[str]] = {r.id: [] for r in records}
    for record, reason in _by_rules(eligible, rules, now):
        keep[record.id].append(reason)
    if eligible and not any(keep[r.id] for r in eligible):
        keep[eligible[-1].id].append("the newest restorable backup (no rule kept any)")
    for backup_id, reason in _failure_protection(view, eligible):
        keep[backup_id].append(reason)
    for backup_id, reason in _unreadable_protection(view, now):
        keep[backup_id].append(reason)

    # Per prefix, every link that a backup kept whole needs.
    links: dict[str, dict[str, list[str]]] = {r.id: {} for r in records}
    for record in records:
        if keep[record.id]:
            for prefix, below in _links(view, record.id):
                if below.manifest is not None and prefix in below.manifest.entries:
                    links[below.id].setdefault(prefix, []).append(record.id)

    decisions = []
    for record in records:
        decision = Decision(record.id, record.time, "keep", list(keep[record.id]))
        needed = links[record.id]
        decision.reasons += [
            f"base of {', '.join(sorted(set(ids)))} ({prefix})"
            for prefix, ids in sorted(needed.items())
        ]
        if record.foreign:
            decision.action = "leave"
            decision.reasons = [f"not hotcopy's, left in place: {record.problem}"]
        elif record.unreadable:
            decision.action = "leave"
            decision.reasons = [f"left in place: {record.problem}"]
        elif keep[record.id]:
            pass
        elif needed:
            assert record.manifest is not None
            dropped = sorted(set(record.manifest.entries) - set(needed))
            if dropped:
                decision.action = "trim"
                decision.keep_prefixes = set(needed)
                decision.drop_prefixes = dropped
                decision.reasons.append(f"drops {', '.join(dropped)}")
        else:
            decision.action = "remove"
            decision.reasons = [_why_removed(view, record)]
        decisions.append(decision)
    if not eligible:
        # Nothing restorable: keep everything but the debris of dead runs until something is.
        for decision in decisions:
            if (
                decision.action in ("remove", "trim")
                and view.records[decision.id].status != UNFINISHED
            ):
                decision.action = "keep"
                decision.reasons = [
                    "nothing in this catalog is restorable: prune removes no backup until "
                    "one is (see `hotcopy verify`)"
                ]
    return decisions


def _by_rules(eligible: list[Record], rules: Rules, now: float) -> Iterable[tuple[Record, str]]:
    newest_first = list(reversed(eligible))
    if rules.last:
        for record in newest_first[: rules.last]:
            yield record, f"keep-last {rules.last}"
    for name, period in PERIODS.items():
        count = getattr(rules, name)
        seen: set[Any] = set()
        for record in newest_first:
            if not count or len(seen) >= count:
                break
            bucket, label = period(datetime.fromtimestamp(record.time, UTC))
            if bucket not in seen:
                seen.add(bucket)
                yield record, f"{name} {label}"
    if rules.within is not None:
        since = now - parse_duration(rules.within)
        for record in newest_first:
            if record.time >= since:
                yield record, f"within {rules.within}"


def _failure_protection(view: CatalogView, eligible: list[Record]) -> Iterable[tuple[str, str]]:
    """For each prefix whose newest attempt failed: the backup that records the failure, and
    the newest complete, restorable backup holding the prefix."""
    manifests = view.manifests()
    prefixes = {name for m in manifests for name in (*m.entries, *m.failed)}
    for prefix in sorted(prefixes):
        attempt = next(
            (m for m in reversed(manifests) if prefix in m.entries or prefix in m.failed), None
        )
        if attempt is None or prefix not in attempt.failed:
            continue
        yield attempt.id, f"records that {prefix} failed"
        copy = next(
            (
                r
                for r in reversed(eligible)
                if r.manifest is not None and prefix in r.manifest.entries
            ),
            None,
        )
        if copy is not None:
            yield copy.id, f"newest complete copy of {prefix}, which {attempt.id} failed to take"


def _why_removed(view: CatalogView, record: Record) -> str:
    if record.status == UNFINISHED:
        return "a run that never finished (no manifest)"
    if record.manifest is None:
        return f"not usable: {record.problem}"
    if record.status != COMPLETE:
        return "partial: never kept by retention"
    problem = view.restorable_problem(record.id)
    if problem is not None:
        return f"not restorable: {problem}"
    return "kept by no rule"


def prune(
    dest_dir: str | os.PathLike[str],
    keep_last: int | None = None,
    *,
    keep_hourly: int | None = None,
    keep_daily: int | None = None,
    keep_weekly: int | None = None,
    keep_monthly: int | None = None,
    keep_within: str | None = None,
    dry_run: bool = False,
    key_file: str | os.PathLike[str] | None = None,
    clock: Callable[[], float] = time.time,
    acquire_lock: LockWait | None = None,
) -> PruneReport:
    """Apply retention rules to the catalog ``dest_dir`` (see the module docstring).

    With ``dry_run`` nothing changes: the report says what would be kept and removed.
    ``acquire_lock`` takes the catalog lock (see ``Catalog.locked``).
    """
    rules = Rules(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_within)
    catalog = Catalog(dest_dir, key_file=key_file)
    with catalog.locked(acquire_lock):
        if not dry_run:
            catalog.sweep_abandoned()  # temps and unfinished uploads of runs that were killed
        view = catalog.scan()
        decisions = plan(view, rules, clock())
        if not dry_run:
            _execute(catalog, view, decisions, clock())
    return PruneReport(decisions, dry_run)


def _execute(catalog: Catalog, view: CatalogView, decisions: list[Decision], now: float) -> None:
    place = catalog.place
    # 1. Manifests, newest first: a trim's new one, or a removed backup's removed. A backup
    #    only ever depends on older ones, so whatever depended on what goes has gone first.
    #    One this user may not change (another member's, in a shared catalog) stays as it is,
    #    and so does every backup it links to.
    needed: dict[str, str] = {}  # backup id -> the one left whole that links to it
    for decision in reversed(decisions):
        if decision.action not in ("trim", "remove"):
            continue
        if decision.id in needed:
            decision.action = "keep"
            decision.reasons = [f"base of {needed[decision.id]}, which prune could not change"]
        else:
            try:
                if decision.action == "trim":
                    _trim(catalog, view.records[decision.id], decision, now)
                elif place.remove([f"{decision.id}/{MANIFEST}"]):  # the name only: never followed
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), MANIFEST)
            except PermissionError:
                decision.action = "leave"
                decision.reasons = ["left in place: permission denied (not this user's to change)"]
            else:
                fault(FAULT_POINT)
                continue
        for base in _bases(view, decision.id):
            needed.setdefault(base, decision.id)
    removals = [d for d in decisions if d.action == "remove"]
    # 2. Then their files, and the pieces no manifest names any more.
    for decision in removals:
        try:
            why = place.remove_backup(decision.id)
        except PermissionError as err:
            why = f"permission denied ({err.strerror})"
            if view.records[decision.id].manifest is None:
                decision.action = "leave"  # nothing of a backup in it was removed
        if why is not None:
            decision.reasons.append(f"directory left in place: {why}")
        # its logical documents, if any
        place.remove(document_name(decision.id, kind) for kind in ("full", "delta"))
        fault(FAULT_POINT)
    for decision in decisions:
        manifest = view.records[decision.id].manifest
        if decision.action in ("keep", "trim") and manifest is not None:
            kept = decision.keep_prefixes if decision.action == "trim" else set(manifest.entries)
            named = {manifest.entries[prefix].file for prefix in kept}
            try:
                if place.remove_unnamed_pieces(decision.id, named):
                    fault(FAULT_POINT)
            except PermissionError as err:
                decision.reasons.append(
                    f"pieces no manifest names left in place: permission denied ({err.filename})"
                )


def _unreadable_protection(view: CatalogView, now: float) -> Iterator[tuple[str, str]]:
    """A backup this user may not read may link to any older one, and any newer one may
    link to it: while one is there, those stay (kept whole), whatever the rules say. One
    named for a time to come (beyond a day of clock skew) was not made by a run yet: it
    protects nothing (else a directory named for 2999 would keep every backup for good)."""
    horizon = (now + _CLOCK_SKEW) * 1_000_000
    unreadable = [r for r in view.ordered() if r.unreadable and r.time_us <= horizon]
    if not unreadable:
        return
    newest = max(unreadable, key=lambda r: r.time_us)
    for record in view.ordered():
        if record.manifest is None:
            continue
        if record.time_us < newest.time_us:
            yield record.id, f"may be a base of {newest.id}, which this user may not read"
        elif (through := _unreadable_link(view, record.id)) is not None:
            yield record.id, f"links through {through}, which this user may not read"


def _unreadable_link(view: CatalogView, backup_id: str) -> str | None:
    """The first backup this user may not read on a chain of ``backup_id``, if any."""
    return next((below.id for _, below in _links(view, backup_id) if below.unreadable), None)


def _links(view: CatalogView, backup_id: str) -> Iterator[tuple[str, Record]]:
    """``(prefix, backup)`` for every backup a chain of ``backup_id`` links to, nearest first,
    as far as the manifests show."""
    manifest = view.records[backup_id].manifest
    for prefix, entry in manifest.entries.items() if manifest is not None else ():
        base = entry.base
        while base is not None and base in view.records:
            below = view.records[base]
            yield prefix, below
            if below.manifest is None or prefix not in below.manifest.entries:
                break
            base = below.manifest.entries[prefix].base


def _bases(view: CatalogView, backup_id: str) -> set[str]:
    """Every backup that ``backup_id``'s manifest links to, directly or through another."""
    return {below.id for _, below in _links(view, backup_id)}


def _trim(catalog: Catalog, record: Record, decision: Decision, now: float) -> None:
    """Rewrite the manifest of ``record`` to hold only what kept backups need (partial)."""
    manifest = record.manifest
    assert manifest is not None
    reason = f"removed by prune on {iso_utc(now)}: no kept backup needs it"
    catalog.write_manifest(
        Manifest(
            id=manifest.id,
            created=manifest.created,
            repository_id=manifest.repository_id,
            planned=manifest.planned,
            consistent=manifest.consistent,
            interrupted=manifest.interrupted,
            entries={p: e for p, e in manifest.entries.items() if p in decision.keep_prefixes},
            failed=manifest.failed,
            pruned={**manifest.pruned, **dict.fromkeys(decision.drop_prefixes, reason)},
        )
    )
