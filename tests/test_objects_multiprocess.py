"""The object layer across processes: fresh interpreters (``python -c``) load what another
process stored, and several processes create scoped objects on shared prefixes at once without
losing any. Real processes, real leases, real fsync; every child is reaped in ``finally``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hotcopy.storage as hc
import pytest
from hotcopy_test_support import storage_helpers

h = storage_helpers()
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]

WORKERS = 3
ITEMS = 12
INCREMENTS = 10

# The classes every process uses. A type_id names them the same in every process, whatever
# module defines them (here: __main__ in the children, this test module in the parent).
CLASSES = """
import sys
import hotcopy.storage as hc

@hc.memo(prefix="shared-items", type_id="mp.Item")
class Item:
    def __init__(self, writer, number):
        self.writer = writer
        self.number = number

@hc.memo(prefix="shared-items", singleton=True, type_id="mp.Registry")
class Registry:
    def __init__(self):
        self.items = hc.list()
        self.count = 0

@hc.memo(type_id="mp.Project")
class Project:
    def __init__(self, client, writer, number):
        hc.set_prefix(self, f"client_{client}")
        self.writer = writer
        self.number = number

@hc.enum(values=["NEW", "DONE"], prefix="states", type_id="mp.State")
class State:
    pass
"""

namespace: dict[str, object] = {}
exec(CLASSES, namespace)  # the parent's own copy of the classes
Item = namespace["Item"]
Registry = namespace["Registry"]
Project = namespace["Project"]
State = namespace["State"]

WORKER = (
    CLASSES
    + """
root, writer = sys.argv[1], int(sys.argv[2])
hc.init(root, lease_timeout=60)
hc.open(f"workspace-{writer}", "rw")
print("ready", flush=True)
assert sys.stdin.readline() == "go\\n"
items = hc.get_prefix_of(Item)
conflicts = 0
for number in range(ITEMS):
    # Read-modify-write of the shared registry: the transaction holds the prefix's write lease
    # from before the first read, so no other process commits in between.
    with items.transaction():
        item = Item(writer, number)
        hc.tags(item).add(State.NEW, f"writer-{writer}")
        registry = hc.fetch(Registry)
        registry.items.append(item)
        registry.count += 1
    # The other style: read, then write without a transaction; when another process committed
    # in between, the first write raises TransactionConflict (nothing written): read again.
    client = number % 2
    while True:
        try:
            seen = len(hc.find(Project, "project", prefix=f"client_{client}"))
            project = Project(client, writer, number)
            project.seen = seen
            hc.tags(project).add("project")
            hc.commit()
            break
        except hc.TransactionConflict:
            conflicts += 1
print("done", conflicts, flush=True)
hc.close()
"""
).replace("ITEMS", str(ITEMS))


def _start(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_processes_create_scoped_objects_concurrently_without_loss(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    hc.init(root)
    hc.open("main", "rw")
    try:
        Registry()  # the singleton every worker appends to
        hc.commit()
        hc.close()
        procs = [_start(WORKER, str(root), str(writer)) for writer in range(WORKERS)]
        try:
            for proc in procs:  # start barrier: all are ready before any begins
                assert proc.stdout is not None and proc.stdout.readline() == "ready\n", (
                    proc.communicate(timeout=30)[1]
                )
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for proc in procs:
                out, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err
                assert out.startswith("done "), out
        finally:
            for proc in procs:
                h.reap_popen(proc)

        hc.init(root)
        hc.open("main", "r")
        expected = {(w, n) for w in range(WORKERS) for n in range(ITEMS)}
        items = hc.find(Item, State.NEW)
        assert sorted((i.writer, i.number) for i in items) == sorted(expected)
        for writer in range(WORKERS):
            assert {i.number for i in hc.find(Item, f"writer-{writer}")} == set(range(ITEMS))
        registry = hc.fetch(Registry)
        assert registry.count == WORKERS * ITEMS
        assert sorted(hc.uuid(i) for i in registry.items) == sorted(hc.uuid(i) for i in items)
        assert all(hc.getrefcount(i) == 1 for i in items)
        projects = [
            p for client in (0, 1) for p in hc.find(Project, "project", prefix=f"client_{client}")
        ]
        assert sorted((p.writer, p.number) for p in projects) == sorted(expected)
        for p in projects:
            assert hc.get_prefix_of(p).name == f"client_{p.number % 2}"
    finally:
        hc.close()


READER = (
    CLASSES
    + """
root, item_id = sys.argv[1], sys.argv[2]
hc.init(root)
hc.open("main", "rw")
item = hc.fetch(Item, item_id)
registry = hc.fetch(Registry)
assert [hc.uuid(i) for i in registry.items] == [item_id]
assert hc.tags(item) and list(hc.tags(item)) == [State.DONE]
assert (item.writer, item.number, item.blob, item.link.number) == ("parent", 7, b"\\x00\\x01", 8)
item.number = 70
registry.count += 1
hc.commit()
print(hc.uuid(item.link))
hc.close()
"""
)


def test_objects_survive_a_process_restart_in_both_directions(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    hc.init(root)
    hc.open("main", "rw")
    try:
        item, other = Item("parent", 7), Item("parent", 8)
        item.blob = b"\x00\x01"
        item.link = other
        hc.tags(item).add(State.DONE)
        registry = Registry()
        registry.items.append(item)
        hc.commit()
        item_id, other_id = hc.uuid(item), hc.uuid(other)
        hc.close()  # this process lets go of everything

        result = h.run_python(READER, str(root), item_id)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == other_id

        hc.init(root)
        hc.open("main", "r")
        assert hc.fetch(Item, item_id).number == 70  # the other process's change
        assert hc.fetch(Registry).count == 1
        assert hc.fetch(Item, item_id).link is hc.fetch(Item, other_id)
    finally:
        hc.close()


DELETER = (
    CLASSES
    + """
hc.init(sys.argv[1])
hc.open("main", "rw")
(user,) = hc.find(Project, "user", prefix="client_users")
hc.tags(user).remove("user")  # now only this handle keeps it
del user
hc.commit()
print(len(hc.find(Project, "user", prefix="client_users")))
hc.close()
"""
)


def test_a_deletion_in_another_process_expires_proxies_here(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    hc.init(root)
    hc.open("main", "rw")
    try:
        user = Project("users", "user", 1)
        hc.tags(user).add("user")
        doc = Item("doc", 1)
        doc.author = hc.weak_proxy(user)
        hc.commit()
        assert not hc.expired(doc.author) and doc.author.number == 1

        result = h.run_python(DELETER, str(root))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "0"

        assert hc.expired(doc.author)  # this process sees the other one's commit
        with pytest.raises(hc.ReferenceError):
            _ = doc.author.number
        with pytest.raises(hc.ReferenceError):
            _ = user.number  # the handle this process still held
        assert doc.writer == "doc"
    finally:
        hc.close()
