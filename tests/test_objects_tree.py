"""Collections that grow: ``hc.list``, ``hc.index``, tags and ``find(cls)`` on large sizes.

What a change costs is measured in bytes committed (never in time): one append, add or remove
writes the same few records at any size. Lists and indexes keep their semantics through every
split and merge of their trees (checked against a plain Python model, with tiny nodes so that
trees are deep); a crash mid-commit leaves a tree as it was before or after, never half-way; a
reader in another process sees each commit whole; prefixes written in the one-record layout of
before are read and converted. Real files, real processes; every child reaped.
"""

from __future__ import annotations

import gc
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hotcopy.storage as hc
import pytest
from hotcopy.storage import _tree
from hotcopy_test_support import storage_helpers

h = storage_helpers()
pytestmark = pytest.mark.timeout(120)

# The classes of every process here. A type_id names them the same in the children (defined
# in __main__) as in this module.
CLASSES = """
import hotcopy.storage as hc

@hc.memo(singleton=True, type_id="tree.Holder")
class Holder:
    def __init__(self):
        self.items = hc.list()
        self.index = hc.index()

@hc.memo(type_id="tree.Note")
class Note:
    def __init__(self, number):
        self.number = number

@hc.memo(type_id="tree.Memo")
class Memo(Note):
    pass

@hc.memo(prefix="archive", type_id="tree.Archived")
class Archived:
    def __init__(self, number):
        self.number = number
"""
namespace: dict[str, Any] = {}
exec(CLASSES, namespace)
Holder, Note, Memo, Archived = (namespace[name] for name in ("Holder", "Note", "Memo", "Archived"))


def record_key(obj: object) -> str:
    """The key of ``obj``'s record on its prefix (the uuid names the prefix, the key does not)."""
    return "obj/" + hc.uuid(obj).rpartition(":")[2]


@pytest.fixture
def small_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes of 4 entries: a few dozen items make a tree three levels deep."""
    monkeypatch.setattr(_tree, "NODE_MAX", 4)


def reopen(root: Path) -> None:
    hc.commit()
    hc.close()
    hc.init(root)
    hc.open("main", "rw")


def check_tree(px: hc.Prefix, key: str, *, keyed: bool) -> None:
    _tree.Tree(px, key, px[key], keyed=keyed).check()


def check_container(container: Any) -> None:
    px = hc.get_prefix_of(container)
    check_tree(px, record_key(container), keyed=isinstance(container, hc.MemoIndex))


# -- what one change costs -----------------------------------------------------------------------

SIZE = 3000  # entries before the measured change
# Bytes one commit of one change may write, at any size: a leaf per tree, a header, and where a
# leaf splits its parent too (seen: 1.0-5.7 KB; the one-record layout wrote 42-105 KB).
BOUND = 16 << 10

# name -> (build SIZE entries, make one change); the holder keeps the collections alive.
CHANGES: dict[str, tuple[Callable[[Any, int], None], Callable[[Any], None]]] = {
    "list append": (
        lambda holder, i: holder.items.append(f"item-{i:06}"),
        lambda holder: holder.items.append("one more"),
    ),
    "list insert at 0": (
        lambda holder, i: holder.items.append(f"item-{i:06}"),
        lambda holder: holder.items.insert(0, "first"),
    ),
    "list pop": (
        lambda holder, i: holder.items.append(f"item-{i:06}"),
        lambda holder: holder.items.pop(SIZE // 2),
    ),
    "index add": (
        lambda holder, i: holder.index.add(i * 7 % SIZE, f"value-{i:06}"),
        lambda holder: holder.index.add(SIZE // 2, "one more"),
    ),
    "index remove": (
        lambda holder, i: holder.index.add(i, f"value-{i:06}"),
        lambda holder: holder.index.remove(SIZE // 2, f"value-{SIZE // 2:06}"),
    ),
    "tag add": (
        lambda holder, i: hc.tags(Note(i)).add("many"),
        lambda holder: hc.tags(Note(-1)).add("many"),
    ),
    "tag remove": (
        lambda holder, i: hc.tags(Note(i)).add("many", "kept"),
        lambda holder: hc.tags(hc.find(Note, "many")[SIZE // 2]).remove("many"),
    ),
    "new object": (
        lambda holder, i: hc.tags(Note(i)).add("kept"),
        lambda holder: setattr(holder, "last", Note(-1)),
    ),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_one_change_to_a_large_collection_writes_a_bounded_amount(root: Path, change: str) -> None:
    build, change_once = CHANGES[change]
    holder = Holder()
    for i in range(SIZE):
        build(holder, i)
        if i % 500 == 0:
            hc.commit()
    px = hc.get_current_prefix()
    hc.commit()
    px.checkpoint()  # an empty WAL: what the next commit appends is what it writes
    wal = root / "main.hc-wal"
    before = h.wal_used(wal)
    change_once(holder)
    hc.commit()
    written = h.wal_used(wal) - before
    assert 0 < written < BOUND, f"{change} at {SIZE} entries wrote {written} bytes"


# -- lists and indexes keep their semantics through splits and merges ----------------------------


def test_list_matches_a_python_list_through_splits_and_merges(
    root: Path, small_nodes: None
) -> None:
    rng = random.Random(16)
    holder = Holder()
    items, model = holder.items, []
    for step in range(600):
        value = step
        operation = rng.choice(["append", "append", "insert", "pop", "set", "del", "slice"])
        if operation == "append":
            items.append(value)
            model.append(value)
        elif operation == "insert":
            position = rng.randint(-len(model) - 3, len(model) + 3)
            items.insert(position, value)
            model.insert(position, value)
        elif model and operation == "pop":
            position = rng.randrange(-len(model), len(model))
            assert items.pop(position) == model.pop(position)
        elif model and operation == "set":
            position = rng.randrange(len(model))
            items[position] = model[position] = value
        elif operation == "del":
            start, stop = sorted(rng.randint(0, len(model)) for _ in range(2))
            step_by = rng.choice([1, 2, -1])
            del items[start:stop:step_by]
            del model[start:stop:step_by]
        elif operation == "slice":
            start, stop = sorted(rng.randint(0, len(model)) for _ in range(2))
            new = list(range(1000 + step, 1000 + step + rng.randint(0, 9)))
            items[start:stop] = new
            model[start:stop] = new
        if step % 50 == 0:
            hc.commit()
            assert list(items) == model
            check_container(items)
        if step % 200 == 0:
            reopen(root)
            holder = hc.fetch(Holder)
            items = holder.items
    assert list(items) == model and len(items) == len(model)
    check_container(items)


def test_list_reads_every_way_a_python_list_does(root: Path, small_nodes: None) -> None:
    model = list(range(137))
    items = hc.list(model)
    for index in (0, 1, 5, 64, 136, -1, -137):
        assert items[index] == model[index]
    for index in (137, -138):
        with pytest.raises(IndexError):
            _ = items[index]
    for start, stop, step in [
        (None, None, None),
        (3, 90, 7),
        (90, 3, -5),
        (-10, None, 2),
        (5, 5, 1),
    ]:
        assert items[start:stop:step] == model[start:stop:step]
    items[10:20:3] = ["a", "b", "c", "d"]
    model[10:20:3] = ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="extended slice"):
        items[10:20:3] = ["too", "few"]
    del items[100::4]
    del model[100::4]
    del items[::-7]
    del model[::-7]
    assert list(items) == model and len(items) == len(model)
    assert items.index(model[50]) == 50 and items.count("a") == 1 and "b" in items
    assert list(reversed(items)) == model[::-1]
    check_container(items)
    while items:
        items.pop()
    assert list(items) == [] and not items
    # An empty tree is one record again: nothing left under node/.
    assert [key for key in hc.get_current_prefix() if key.startswith("node/")] == []


def test_index_matches_a_sorted_model_through_splits_and_merges(
    root: Path, small_nodes: None
) -> None:
    rng = random.Random(61)
    idx = Holder().index
    model: list[tuple[Any, str]] = []  # (key, value) in key order, equal keys as added

    def rank(key: Any) -> tuple[bool, Any]:
        return (key is not None, key)

    for step in range(500):
        if model and rng.random() < 0.35:
            key, value = model.pop(rng.randrange(len(model)))  # values are unique
            idx.remove(key, value)
        else:
            key = rng.choice([None, *range(40)])
            value = f"v{step}"
            idx.add(key, value)
            at = max((i + 1 for i, (k, _v) in enumerate(model) if rank(k) <= rank(key)), default=0)
            model.insert(at, (key, value))
        if step % 100 == 0:
            reopen(root)
            idx = hc.fetch(Holder).index
    assert idx.items() == model and len(idx) == len(model)
    assert idx.keys() == [key for key, _value in model]
    for lo, hi in [(None, None), (5, 20), (None, 3), (30, None), (7, 7), (20, 5)]:
        expected = [
            value
            for key, value in model
            if (lo is None or (key is not None and key >= lo))
            and (hi is None or key is None or key < hi)
        ]
        assert idx.range(lo, hi) == expected, (lo, hi)
    check_container(idx)


def test_index_accepts_none_as_a_key_sorted_first(root: Path) -> None:
    idx = hc.index()
    idx.add(2, "two")
    idx.add(None, "nothing")
    idx.add(1, "one")
    idx.add(None, "nothing again")
    assert list(idx) == ["nothing", "nothing again", "one", "two"]
    assert idx.keys() == [None, None, 1, 2]
    assert idx.range(1) == ["one", "two"] and idx.range(None, 2) == [
        "nothing",
        "nothing again",
        "one",
    ]
    holder = Note(0)
    holder.idx = idx
    uid = hc.uuid(holder)
    reopen(root)
    idx = hc.fetch(Note, uid).idx
    assert idx.items() == [(None, "nothing"), (None, "nothing again"), (1, "one"), (2, "two")]
    idx.remove(None, "nothing")
    words = hc.index()
    words.add("b", 1)
    words.add(None, 0)
    with pytest.raises(TypeError, match="str keys"):
        words.add(3, 2)
    assert words.keys() == [None, "b"]
    with pytest.raises(TypeError):
        idx.add("text", 1)  # a numbers index, though None keys come first


def test_an_index_keeps_one_kind_of_key_until_it_is_empty(root: Path, small_nodes: None) -> None:
    idx = hc.index()
    for number in range(20):
        idx.add(number, number)
        idx.add(None, -number)
    for number in range(20):
        idx.remove(number, number)
    with pytest.raises(TypeError, match="numbers keys"):
        idx.add("text", 0)  # its nodes may still be labelled by numbers
    idx.add(7, 7)
    for number in range(20):
        idx.remove(None, -number)
    idx.remove(7, 7)
    idx.add("text", 0)  # empty: any kind again
    assert idx.items() == [("text", 0)]
    check_container(idx)


# -- find by class ------------------------------------------------------------------------------


def test_find_a_class_alone_finds_its_live_instances(root: Path) -> None:
    notes = [Note(i) for i in range(5)]
    memo = Memo(5)
    hc.tags(notes[1]).add("red")
    hc.tags(memo).add("red", "blue")
    assert hc.find(Note) == [*notes, memo]  # a class and its subclasses, oldest first
    assert hc.find(Memo) == [memo]
    assert hc.find(Note, "red") == [notes[1], memo]
    assert hc.find(Note, "red", "blue") == [memo] == hc.find(Memo, "red")
    assert hc.find("red") == [notes[1], memo]  # tags alone: any class
    assert hc.find("blue", Memo) == [memo]  # in any order
    assert hc.find(Archived) == []
    archived = Archived(1)  # a scoped class: found on its own prefix
    assert hc.find(Archived) == [archived]
    kept = hc.uuid(notes[3])
    del notes[3]
    hc.commit()  # the last handle went: deleted, and gone from its class
    assert kept not in [hc.uuid(note) for note in hc.find(Note)]
    assert len(hc.find(Note)) == 5
    reopen(root)
    assert sorted(note.number for note in hc.find(Note)) == [0, 1, 2, 4, 5]


FINDER = (
    CLASSES
    + """
import sys
hc.init(sys.argv[1])
hc.open("main", "rw")
print(sorted(note.number for note in hc.find(Note)))
hc.tags(Note(100)).add("kept")  # (an object no tag or reference keeps dies with its handle)
hc.commit()
hc.close()
"""
)


def test_find_a_class_sees_instances_another_process_made(root: Path) -> None:
    for i in range(3):
        hc.tags(Note(i)).add("kept")
    hc.commit()
    result = h.run_python(FINDER, str(root))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 1, 2]"
    assert sorted(note.number for note in hc.find(Note)) == [0, 1, 2, 100]


# -- lifetime ------------------------------------------------------------------------------------


def test_a_dropped_container_takes_its_nodes_and_what_only_it_kept(
    root: Path, small_nodes: None
) -> None:
    items = hc.list([Note(i) for i in range(40)])
    idx = hc.index()
    for i in range(40):
        idx.add(i, Note(i))
    note_ids = [hc.uuid(note) for note in items] + [hc.uuid(note) for note in idx]
    hc.commit()
    px = hc.get_current_prefix()
    assert any(key.startswith("node/") for key in px)
    del items, idx
    gc.collect()
    hc.commit()
    assert [key for key in px if key.startswith(("node/", "obj/"))] == []
    for uid in note_ids:
        with pytest.raises(hc.ObjectNotFound):
            hc.fetch(Note, uid)
    assert hc.find(Note) == []


# -- the layout of before ------------------------------------------------------------------------


def test_a_prefix_in_the_one_record_layout_is_read_and_converted(root: Path) -> None:
    """Records as hotcopy wrote them before trees and instance sets: a list and an index each
    in one record (longer than a node), a tag's members in one list."""
    px = hc.get_current_prefix()
    holder_id, other_id, list_id, index_id = (f"{n:032x}" for n in range(1, 5))
    old_items = [f"old-{i}" for i in range(150)]
    old_index = [[i, f"v{i}"] for i in range(100)]
    px["obj/" + list_id] = {"class": "$list", "refs": 1, "tags": [], "items": old_items}
    px["obj/" + index_id] = {"class": "$index", "refs": 1, "tags": [], "items": old_index}
    for uid in (holder_id, other_id):
        px["obj/" + uid] = {
            "class": "tree.Note",
            "refs": 0,
            "tags": ["s:old"],
            "attrs": {"number": 1, "items": {"$ref": list_id}, "index": {"$ref": index_id}}
            if uid == holder_id
            else {"number": 2},
        }
    px["tag/s:old"] = [other_id, holder_id]
    reopen(root)

    assert [note.number for note in hc.find(Note, "old")] == [2, 1]
    assert sorted(note.number for note in hc.find(Note)) == [1, 2]  # read from the records
    holder = hc.fetch(Note, holder_id)
    assert list(holder.items) == old_items and holder.items[149] == "old-149"
    assert holder.index.range(98) == ["v98", "v99"]
    holder.items.append("new")  # the first change makes a tree of it
    holder.index.add(50, "v50b")
    new = Note(3)  # the first new object enters the old ones in their class's set
    hc.tags(hc.fetch(Note, other_id)).remove("old")
    reopen(root)

    holder = hc.fetch(Note, holder_id)
    assert list(holder.items) == [*old_items, "new"]
    assert holder.index.range(50, 51) == ["v50", "v50b"]
    assert [note.number for note in hc.find(Note, "old")] == [1]
    # Note 2 lost its last tag through a temporary, with nothing else keeping it: deleted.
    assert sorted(note.number for note in hc.find(Note)) == [1, 3]
    px = hc.get_current_prefix()
    check_container(holder.items)
    check_container(holder.index)
    check_tree(px, "tag/s:old", keyed=True)
    del new


# -- crashes and concurrent readers --------------------------------------------------------------

BATCH = 5  # items appended per commit by the children below

CRASHER = (
    CLASSES
    + """
import os, sys
from hotcopy.storage import _tree
_tree.NODE_MAX = 4
root, journal = sys.argv[1], sys.argv[2]
hc.init(root, checkpoint_bytes=2048)
hc.open("main", "rw")
holder = hc.fetch(Holder)
jfd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
for batch in range(200):
    for k in range(BATCH):
        number = batch * BATCH + k
        holder.items.append(number)
        holder.index.add(number % 7, number)
        hc.tags(Note(number)).add("crash")
    hc.commit()
    os.write(jfd, b"%d\\n" % (batch + 1))
    os.fsync(jfd)
print("the fault never fired")
"""
).replace("BATCH", str(BATCH))


@pytest.mark.crash
@pytest.mark.parametrize(
    ("point", "after"),
    [
        ("commit:before-wal-write", 9),
        ("commit:after-wal-write", 9),
        ("commit:after-wal-fsync", 9),
        ("checkpoint:after-main-write", 3),
    ],
)
def test_a_crash_mid_commit_leaves_each_tree_before_or_after(
    root: Path, small_nodes: None, tmp_path: Path, point: str, after: int
) -> None:
    Holder()
    hc.commit()
    hc.close()
    journal = tmp_path / "journal"
    result = h.run_python(
        CRASHER,
        str(root),
        str(journal),
        env={"HOTCOPY_FAULT": point, "HOTCOPY_FAULT_AFTER": str(after)},
    )
    assert result.returncode == -9, result.stdout + result.stderr
    acked = int(journal.read_text().split()[-1]) if journal.exists() else 0
    assert acked >= 1

    hc.init(root)
    hc.open("main", "rw")
    holder = hc.fetch(Holder)
    numbers = list(holder.items)
    assert len(numbers) in (acked * BATCH, (acked + 1) * BATCH), (acked, len(numbers))
    assert numbers == list(range(len(numbers)))
    assert sorted(value for value in holder.index) == numbers
    assert sorted(note.number for note in hc.find(Note, "crash")) == numbers
    assert sorted(note.number for note in hc.find(Note)) == numbers
    px = hc.get_current_prefix()
    check_container(holder.items)
    check_container(holder.index)
    check_tree(px, "tag/s:crash", keyed=True)
    check_tree(px, "instances/tree.Note", keyed=True)
    holder.items.append(len(numbers))  # and it goes on from there
    hc.commit()
    assert list(holder.items) == list(range(len(numbers) + 1))


READER = (
    CLASSES
    + """
import sys
from hotcopy.storage import _tree
_tree.NODE_MAX = 4
root, final = sys.argv[1], int(sys.argv[2])
hc.init(root)
hc.open("main", "r")
holder = hc.fetch(Holder)
print("ready", flush=True)
seen = set()
while True:
    numbers = list(holder.items)
    assert numbers == list(range(len(numbers))), numbers
    assert len(numbers) % BATCH == 0, len(numbers)
    seen.add(len(numbers))
    if len(numbers) == final:
        break
print(len(seen), flush=True)
hc.close()
"""
).replace("BATCH", str(BATCH))


def test_reads_inside_pinned_see_one_commit(tmp_path: Path) -> None:
    """The mechanism under every tree read: ``Prefix.pinned()``."""
    with (
        hc.Repository.init(tmp_path / "repo") as writer_repo,
        hc.Repository(tmp_path / "repo") as reader_repo,
    ):
        writer = writer_repo.open_prefix("p", "rw")
        writer["a"] = writer["b"] = 1
        writer.commit()
        reader = reader_repo.open_prefix("p", "r")
        with reader.pinned():
            assert reader["a"] == 1
            writer["a"] = writer["b"] = 2
            writer.commit()
            assert (reader["a"], reader["b"], reader.seq) == (1, 1, 1)
        assert (reader["a"], reader["b"], reader.seq) == (2, 2, 2)


@pytest.mark.multiprocess
def test_a_reader_in_another_process_sees_each_commit_whole(root: Path, small_nodes: None) -> None:
    batches = 150
    holder = Holder()
    hc.commit()
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(root), str(batches * BATCH)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline() == "ready\n", reader.communicate(timeout=30)[1]
        for batch in range(batches):
            holder.items.extend(range(batch * BATCH, (batch + 1) * BATCH))
            hc.commit()
        out, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        assert int(out) >= 1
    finally:
        h.reap_popen(reader)
        for pipe in (reader.stdout, reader.stderr):
            if pipe is not None:
                pipe.close()


def test_tree_check_finds_damage(root: Path, small_nodes: None) -> None:
    """The invariant check the tests above rely on can fail."""
    items = hc.list(range(30))
    idx = hc.index()
    for number in range(30):
        idx.add(number, number)
    hc.commit()
    px = hc.get_current_prefix()
    for container, damage, expected in [
        (items, lambda root: root["children"][1].__setitem__(1, 1), "offset"),
        (items, lambda root: root["children"].append([999, 30]), "node id"),
        (idx, lambda root: root["children"][1].__setitem__(1, 1000), "first key"),
    ]:
        key = record_key(container)
        check_container(container)
        root_key = f"node/{key}/{px[key]['root']}"
        root_node = px[root_key]
        damage(root_node)
        px[root_key] = root_node
        with pytest.raises(AssertionError, match=expected):
            check_container(container)
        px.rollback()
    key = record_key(items)
    header = px[key]
    header["size"] = 31
    px[key] = header
    with pytest.raises(AssertionError, match="size"):
        check_container(items)
    px.rollback()
    px[f"node/{key}/999"] = {"items": [1]}  # a stray node
    with pytest.raises(AssertionError, match="node records"):
        check_container(items)
    px.rollback()
