"""Counted B+ trees kept as records of a prefix: how every collection that grows is stored.

A list, an index, the members of a tag and the instances of a class are each one tree, so that
adding or removing an item rewrites the few small records on one path from the root to a leaf,
never the whole collection (kept in one record, building a list of n items cost O(n^2)).

The root node lives in the collection's own record, its *header* (``obj/<uuid>`` of a
container, ``tag/<tag>``, ``instances/<type id>``); every other node is a record
``node/<header key>/<node id>``::

    {"items": [...]}                                     a leaf: items, in order
    {"children": [[node id, items below, first key], ...]}   an internal node

The counts make positions cheap (``lst[i]``, ``len``). A *sorted* tree holds ``[key, value]``
items in key order (equal keys in insertion order, ``None`` before every other key); each
child's items have keys ``>= first key`` and the items before it keys ``<= first key`` (the
first child's is not used). A list's first keys are null. A header that has nodes also keeps
``next``, the next node id. A small collection is its header alone, items inline: exactly the
one-record layout of before the trees, so old records are read as they are and become a tree
when they first outgrow a node.

Node keys live under ``node/`` rather than under their header's key: a tag is any text, so a
node key ``tag/x/n/1`` could be the header of the tag ``x/n/1``. No header starts with
``node/``, and an id holds no ``/``, so a node key names one header and one node.

A tree is read and changed through a :class:`Tree` made for one operation, under
``Prefix.pinned()`` so that all its records come from one commit; changes are written by
:meth:`Tree.flush` into the prefix's transaction, which commits them atomically.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

from ._errors import StorageError

if TYPE_CHECKING:
    from ._prefix import Prefix

NODE_MAX = 64  # items of a leaf, children of an internal node
NODE = "node/"
_ROOT = 0  # the id of the root node, which is the header


def size(node: dict[str, Any]) -> int:
    """The number of items under a node (a header: in its whole tree)."""
    if "items" in node:
        return len(node["items"])
    return sum(child[1] for child in node["children"])


def _entries(node: dict[str, Any]) -> list[Any]:
    entries: list[Any] = node["items"] if "items" in node else node["children"]
    return entries


def _rank(key: Any) -> tuple[bool, Any]:
    return (key is not None, key)


class Tree:
    """One tree, for the length of one operation: nodes are read once and kept; the changed
    ones (and the header) are written by :meth:`flush`.

    Args:
        px: The prefix holding the tree.
        key: The header's key.
        header: The header record as read (changed in place).
        keyed: Items are ``[key, value]`` kept in key order (else: a list, in position order).
    """

    def __init__(
        self, px: Prefix, key: str, header: dict[str, Any], *, keyed: bool = False
    ) -> None:
        self._px = px
        self.key = key
        self.header = header
        self._keyed = keyed
        self._nodes: dict[int, dict[str, Any]] = {_ROOT: header}
        self._changed: set[int] = set()
        self._new: set[int] = set()  # created by this operation: never written yet
        self._gone: set[int] = set()

    # -- reading ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return size(self.header)

    def get(self, position: int) -> Any:
        """The item at ``position`` (``0 <= position < len``)."""
        if not 0 <= position < len(self):
            raise IndexError("list index out of range")
        _path, leaf_id, local = self._descend(position)
        return self._node(leaf_id)["items"][local]

    def slice(self, start: int, stop: int) -> list[Any]:
        """The items at positions ``start <= p < stop``; reads only the nodes holding them."""
        out: list[Any] = []
        self._collect(self.header, max(start, 0), stop, out)
        return out

    def items(self) -> list[Any]:
        return self.slice(0, len(self))

    def bisect(self, key: Any, *, right: bool) -> int:
        """In a sorted tree: the first position whose key is ``> key`` (``right``) or
        ``>= key``."""
        return self._descend_key(key, right=right)[3]

    def _collect(self, node: dict[str, Any], start: int, stop: int, out: list[Any]) -> None:
        if "items" in node:
            out.extend(node["items"][start:stop])
            return
        for child_id, count, _first in node["children"]:
            if stop <= 0:
                return
            if start < count:
                self._collect(self._node(child_id), max(start, 0), stop, out)
            start -= count
            stop -= count

    # -- changing ---------------------------------------------------------------------------

    def insert(self, position: int, item: Any) -> None:
        """Insert ``item`` before ``position`` (``0 <= position <= len``); lists only."""
        appending = position == len(self)
        path, leaf_id, local = self._descend(position, inserting=True)
        self._node(leaf_id)["items"].insert(local, item)
        self._grew(path, leaf_id, 1, appending)

    def insert_sorted(self, item: list[Any]) -> None:
        """Insert ``[key, value]`` after the items with an equal key; sorted trees only."""
        # Not through insert(position): at a boundary between two leaves, the key decides which
        # one may take it (the right one's first key may be lower than its first item's).
        path, leaf_id, local, position = self._descend_key(item[0], right=True)
        appending = position == len(self)
        self._node(leaf_id)["items"].insert(local, item)
        self._grew(path, leaf_id, 1, appending)

    def replace(self, position: int, item: Any) -> Any:
        """Put ``item`` at ``position`` in place of the item there, which is returned."""
        _path, leaf_id, local = self._descend(position)
        items = self._node(leaf_id)["items"]
        old, items[local] = items[local], item
        self._changed.add(leaf_id)
        return old

    def pop(self, position: int) -> Any:
        """Remove and return the item at ``position``."""
        path, leaf_id, local = self._descend(position)
        item = self._node(leaf_id)["items"].pop(local)
        self._grew(path, leaf_id, -1)
        return item

    def flush(self) -> None:
        """Write the changed nodes and the header into the prefix's transaction."""
        for node_id in sorted(self._changed - {_ROOT}):
            self._px[self._node_key(node_id)] = self._nodes[node_id]
        for node_id in sorted(self._gone):
            del self._px[self._node_key(node_id)]
        self._px[self.key] = self.header
        self._changed.clear()
        self._new.clear()
        self._gone.clear()

    def drop(self) -> list[Any]:
        """Delete every node record (the header is the caller's); return the items held."""
        items = self.items()
        for node_id, _node, _depth in self._walk():
            if node_id != _ROOT:
                del self._px[self._node_key(node_id)]
        return items

    # -- invariants -------------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``AssertionError`` unless the tree is well formed: counts, key order, node
        fill, all leaves at one depth, and no node record outside the tree. For tests and
        stress runs (it reads every node and every key of the prefix)."""
        leaf_depths = set()
        reachable = set()
        ranks: list[tuple[bool, Any]] = []
        for node_id, node, depth in self._walk():
            reachable.add(node_id)
            entries = _entries(node)
            if node_id != _ROOT:
                assert 0 < len(entries) <= NODE_MAX, f"node {node_id} holds {len(entries)}"
            if "children" in node:
                assert 2 <= len(entries) <= NODE_MAX or node_id != _ROOT, "root size"
                for child_id, count, _first in entries:
                    assert 0 < child_id < self.header.get("next", 1), f"node id {child_id}"
                    assert count == size(self._node(child_id)), f"count of node {child_id}"
            else:
                leaf_depths.add(depth)
                if self._keyed:
                    ranks.extend(_rank(item[0]) for item in entries)
        assert len(leaf_depths) <= 1, f"leaves at depths {sorted(leaf_depths)}"
        assert ranks == sorted(ranks), "items out of key order"
        if self._keyed and "children" in self.header:
            self._check_first_keys(self.header)
        start = f"{NODE}{self.key}/"
        stored = {
            int(key[len(start) :])
            for key in self._px
            if key.startswith(start) and key[len(start) :].isdigit()
        }
        assert stored == reachable - {_ROOT}, f"node records {sorted(stored)}, tree {reachable}"

    def _check_first_keys(self, node: dict[str, Any]) -> tuple[Any, Any]:
        """The lowest and highest key rank under ``node``, asserting that each first key
        bounds its child from below and the children before it from above."""
        if "items" in node:
            return _rank(node["items"][0][0]), _rank(node["items"][-1][0])
        children = node["children"]
        bounds = [self._check_first_keys(self._node(child[0])) for child in children]
        for slot in range(1, len(children)):
            first = _rank(children[slot][2])
            assert bounds[slot - 1][1] <= first <= bounds[slot][0], f"first key {children[slot]}"
        return bounds[0][0], bounds[-1][1]

    # -- internals --------------------------------------------------------------------------

    def _node_key(self, node_id: int) -> str:
        return f"{NODE}{self.key}/{node_id}"

    def _node(self, node_id: int) -> dict[str, Any]:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._px.get(self._node_key(node_id))
            if node is None:
                raise StorageError(
                    f"node {node_id} of {self.key!r} on prefix {self._px.name!r} is missing: "
                    "the prefix is damaged; restore it from a backup",
                    prefix=self._px.name,
                    key=self.key,
                )
            self._nodes[node_id] = node
        return node

    def _walk(self) -> list[tuple[int, dict[str, Any], int]]:
        """Every node as (id, node, depth), parents before children, in item order."""
        out = []
        stack = [(_ROOT, 0)]
        while stack:
            node_id, depth = stack.pop()
            node = self._node(node_id)
            out.append((node_id, node, depth))
            if "children" in node:
                stack.extend((child[0], depth + 1) for child in reversed(node["children"]))
        return out

    def _descend(
        self, position: int, *, inserting: bool = False
    ) -> tuple[list[tuple[int, int]], int, int]:
        """The path ``[(node id, child slot)]`` to the leaf holding ``position``, that leaf's id
        and the position in it. Inserting at a boundary between leaves goes to the left one
        (so appends go to the last leaf)."""
        path = []
        node_id, node = _ROOT, self.header
        while "children" in node:
            children = node["children"]
            slot = 0
            while slot < len(children) - 1 and position >= children[slot][1] + inserting:
                position -= children[slot][1]
                slot += 1
            path.append((node_id, slot))
            node_id = children[slot][0]
            node = self._node(node_id)
        return path, node_id, position

    def _descend_key(self, key: Any, *, right: bool) -> tuple[list[tuple[int, int]], int, int, int]:
        """As :meth:`_descend`, by key: also returns the position in the whole tree."""
        rank = _rank(key)
        path = []
        offset = 0
        node_id, node = _ROOT, self.header
        while "children" in node:
            children = node["children"]
            slot = 0
            for candidate in range(1, len(children)):
                first = _rank(children[candidate][2])
                if not (first < rank or (right and first == rank)):
                    break
                slot = candidate
            offset += sum(child[1] for child in children[:slot])
            path.append((node_id, slot))
            node_id = children[slot][0]
            node = self._node(node_id)
        find = bisect.bisect_right if right else bisect.bisect_left
        local = find(node["items"], rank, key=lambda item: _rank(item[0]))
        return path, node_id, local, offset + local

    def _grew(
        self, path: list[tuple[int, int]], leaf_id: int, delta: int, appending: bool = False
    ) -> None:
        """A leaf gained or lost ``delta`` items: count it on the path, then rebalance."""
        self._changed.add(leaf_id)
        for node_id, slot in path:
            self._node(node_id)["children"][slot][1] += delta
            self._changed.add(node_id)
        node_id = leaf_id
        while path:
            parent_id, slot = path.pop()
            parent = self._node(parent_id)
            entries = _entries(self._node(node_id))
            if len(entries) > NODE_MAX:
                self._split(parent, slot, appending)
            elif not entries:
                del parent["children"][slot]
                self._drop(node_id)
            elif len(entries) < NODE_MAX // 4:
                self._merge(parent, slot)
            else:
                return  # the nodes above only changed counts
            node_id = parent_id
        self._fix_root(appending)

    def _split(self, parent: dict[str, Any], slot: int, appending: bool) -> None:
        """Split the child at ``slot`` into nodes of at most NODE_MAX entries (more than two
        only for an old one-record collection, whose root may hold any number).

        In halves, except after an append to the end of the tree: then the full node stays
        full and the new one starts with the one new entry, so a collection built by appends
        has full nodes (half as many as with halves) and its last leaf, which every append
        rewrites, holds half as many items on average.
        """
        child_id = parent["children"][slot][0]
        child = self._node(child_id)
        kind = "items" if "items" in child else "children"
        entries = child[kind]
        pieces = -(-len(entries) // NODE_MAX)
        step = NODE_MAX if appending else -(-len(entries) // pieces)
        child[kind] = entries[:step]
        parent["children"][slot][1] = size(child)
        self._changed.add(child_id)
        for at in range(step, len(entries), step):
            node = {kind: entries[at : at + step]}
            slot += 1
            parent["children"].insert(slot, [self._create(node), size(node), self._first(node)])

    def _merge(self, parent: dict[str, Any], slot: int) -> None:
        """Merge the underfull child at ``slot`` with a neighbour if both fit in one node.
        One that does not fit has a neighbour over 3/4 full: the pair is at least half full."""
        children = parent["children"]
        if len(children) < 2:
            return  # an only child: its parent is underfull too, and handled above
        left = slot - 1 if slot > 0 else slot
        left_id, right_id = children[left][0], children[left + 1][0]
        left_node, right_node = self._node(left_id), self._node(right_id)
        if len(_entries(left_node)) + len(_entries(right_node)) > NODE_MAX:
            return
        if "children" in right_node:
            # Its first child's first key was unused; after the merge it bounds that child.
            right_node["children"][0][2] = children[left + 1][2]
        _entries(left_node).extend(_entries(right_node))
        children[left][1] += children[left + 1][1]
        del children[left + 1]
        self._changed.add(left_id)
        self._drop(right_id)

    def _fix_root(self, appending: bool) -> None:
        """Grow the tree by a level while the root overflows; shrink it while the root is an
        internal node with one child (or none)."""
        root = self.header
        while True:
            entries = _entries(root)
            if len(entries) > NODE_MAX:
                kind = "items" if "items" in root else "children"
                child = {kind: root.pop(kind)}
                root["children"] = [[self._create(child), size(child), self._first(child)]]
                self._split(root, 0, appending)
            elif "children" in root and len(entries) <= 1:
                del root["children"]
                if entries:
                    child_id = entries[0][0]
                    root.update(self._node(child_id))
                    self._drop(child_id)
                else:
                    root["items"] = []
            else:
                return

    def _first(self, node: dict[str, Any]) -> Any:
        """The first key of a node split off the right of another: its first item's key, or
        its first child's (which was not a first child before, so its first key is valid)."""
        if not self._keyed:
            return None
        return node["items"][0][0] if "items" in node else node["children"][0][2]

    def _create(self, node: dict[str, Any]) -> int:
        node_id: int = self.header.get("next", 1)
        self.header["next"] = node_id + 1
        self._nodes[node_id] = node
        self._new.add(node_id)
        self._changed.add(node_id)
        return node_id

    def _drop(self, node_id: int) -> None:
        self._nodes.pop(node_id, None)
        self._changed.discard(node_id)
        if node_id in self._new:
            self._new.discard(node_id)
        else:
            self._gone.add(node_id)


class MemberSet:
    """The uuids of a tag's members or of a class's instances on one prefix, in the order they
    were added: a sorted tree of ``[uuid, ordinal]``, found by uuid, listed by ordinal.

    The header is deleted with the last member: an empty set leaves no key behind. Before the
    trees, a tag's members were one record, a list of uuids: read as it is, converted to a tree
    by the first change.
    """

    def __init__(self, px: Prefix, key: str) -> None:
        self._px = px
        self._key = key

    def members(self) -> list[str]:
        with self._px.pinned():
            header = self._px.get(self._key)
            if header is None:
                return []
            if isinstance(header, list):
                return list(header)
            items = Tree(self._px, self._key, header, keyed=True).items()
        return [uuid for uuid, _ordinal in sorted(items, key=lambda item: item[1])]

    def add(self, *uuids: str) -> None:
        with self._px.pinned():
            tree = self._open()
            for uuid in uuids:
                if not self._has(tree, uuid):
                    ordinal = tree.header.get("added", 0)
                    tree.header["added"] = ordinal + 1
                    tree.insert_sorted([uuid, ordinal])
            tree.flush()

    def remove(self, *uuids: str) -> None:
        with self._px.pinned():
            if self._key not in self._px:
                return
            tree = self._open()
            for uuid in uuids:
                if self._has(tree, uuid):
                    tree.pop(tree.bisect(uuid, right=False))
            tree.flush()
            if not len(tree):
                del self._px[self._key]

    def _open(self) -> Tree:
        header = self._px.get(self._key)
        legacy = header if isinstance(header, list) else []
        if not isinstance(header, dict):
            header = {"items": []}
        tree = Tree(self._px, self._key, header, keyed=True)
        for ordinal, uuid in enumerate(legacy):
            tree.insert_sorted([uuid, ordinal])
        if legacy:
            header["added"] = len(legacy)
        return tree

    @staticmethod
    def _has(tree: Tree, uuid: str) -> bool:
        position = tree.bisect(uuid, right=False)
        return position < len(tree) and tree.get(position)[0] == uuid
