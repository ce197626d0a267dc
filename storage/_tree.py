"""B+ trees kept as records of a prefix: how every collection that grows is stored.

A list, an index, the members of a tag and the instances of a class are each one tree, so that
adding or removing an item rewrites its leaf and the collection's own record, never the whole
collection (kept in one record, building a list of n items cost O(n^2)); a leaf that splits
or merges rewrites its parent too.

Each collection has its own record, its *header* (``obj/<uuid>`` of a container,
``tag/<tag>``, ``instances/<type id>``); its nodes are records ``node/<header key>/<node id>``::

    {"items": [...]}                                   a leaf: the items, in order
    {"children": [[node id, label], ...]}              an internal node

A small collection is its header alone, holding its one leaf's ``items`` inline: exactly the
one-record layout of before the trees, so old records are read as they are and become a tree
when they first outgrow a node. Then the header keeps ``root`` (the root node's id), ``size``
(the items) and ``next`` (the next node id): small, it is the one record besides a leaf that
every change rewrites (the root node changes only when its children do).

In a *list* a child's label is its offset: the items of the children before it in the same
node. An item added after or removed from the last child of each node on its path (an append,
a pop at the end) leaves every label alone; in the middle, the nodes on the path where the
child is not the last are rewritten. In a *sorted* tree items are ``[key, value]`` in key order
(equal keys in insertion order, ``None`` before every other key), found by key, not position,
and a child's label is its first key: its items have keys ``>=`` it, the items before it keys
``<=`` it (the first child's label is not used), so no change of a leaf changes a label.

Node keys live under ``node/`` rather than under their header's key: a tag is any text, so a
node key ``tag/x/n/1`` could be the header of the tag ``x/n/1``. No header starts with
``node/``, and an id holds no ``/``, so a node key names one header and one node.

A tree is read and changed through a :class:`Tree` made for one operation, under
``Prefix.pinned()`` so that all its records come from one commit; changes are written by
:meth:`Tree.flush` into the prefix's transaction, which commits them atomically.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from ._errors import StorageError

if TYPE_CHECKING:
    from ._prefix import Prefix

NODE_MAX = 64  # items of a leaf, children of an internal node
NODE = "node/"
_HEADER = 0  # the node id of the header, which is the root while the tree is one leaf
_label = itemgetter(1)

Path = list[tuple[int, int]]  # (node id, child slot) from the root down to a leaf's parent


def size(header: dict[str, Any]) -> int:
    """The number of items in the tree whose header this is."""
    if "root" in header:
        total: int = header["size"]
        return total
    return len(header["items"])


def _entries(node: dict[str, Any]) -> list[Any]:
    entries: list[Any] = node["items"] if "items" in node else node["children"]
    return entries


def _rank(key: Any) -> tuple[bool, Any]:
    return (key is not None, key)


def _item_rank(item: list[Any]) -> tuple[bool, Any]:
    return (item[0] is not None, item[0])


class Tree:
    """One tree, for the length of one operation: nodes are read once and kept; the changed
    ones (and the header) are written by :meth:`flush`.

    Args:
        px: The prefix holding the tree.
        key: The header's key.
        header: The header record as read (changed in place).
        keyed: A sorted tree of ``[key, value]`` items (else: a list, by position).
    """

    def __init__(
        self, px: Prefix, key: str, header: dict[str, Any], *, keyed: bool = False
    ) -> None:
        self._px = px
        self.key = key
        self.header = header
        self._keyed = keyed
        self._nodes: dict[int, dict[str, Any]] = {_HEADER: header}
        self._changed: set[int] = set()
        self._new: set[int] = set()  # created by this operation: never written yet
        self._gone: set[int] = set()

    # -- reading ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return size(self.header)

    def items(self) -> list[Any]:
        """Every item, in order."""
        return [item for _id, node, _depth in self._walk() for item in node.get("items", ())]

    def get(self, position: int) -> Any:
        """In a list: the item at ``position`` (``0 <= position < len``)."""
        if not 0 <= position < len(self):
            raise IndexError("list index out of range")
        _path, leaf_id, local = self._descend(position)
        return self._node(leaf_id)["items"][local]

    def slice(self, start: int, stop: int) -> list[Any]:
        """In a list: the items at positions ``start <= p < stop``, reading only their nodes."""
        out: list[Any] = []
        root = self._node(self._root_id())
        self._collect(root, len(self), max(start, 0), min(stop, len(self)), out)
        return out

    def scan(self, key: Any) -> Iterator[Any]:
        """In a sorted tree: the items with a key ``>= key``, in order (``None``: all)."""
        for _path, leaf_id, local in self._scan(key):
            yield self._node(leaf_id)["items"][local]

    def range(self, lo: Any, hi: Any) -> list[Any]:
        """In a sorted tree: the items with ``lo <= key < hi`` (a ``None`` bound: none)."""
        out = []
        for item in self.scan(lo):
            if hi is not None and _item_rank(item) >= _rank(hi):
                break
            out.append(item)
        return out

    def find(self, key: Any) -> Any:
        """In a sorted tree: the first item with this key, or None."""
        for item in self.scan(key):
            return item if _item_rank(item) == _rank(key) else None
        return None

    def _collect(
        self, node: dict[str, Any], total: int, start: int, stop: int, out: list[Any]
    ) -> None:
        if start >= stop:
            return
        if "items" in node:
            out.extend(node["items"][start:stop])
            return
        children = node["children"]
        for slot, (child_id, offset) in enumerate(children):
            end = children[slot + 1][1] if slot + 1 < len(children) else total
            if end > start and offset < stop:
                child = self._node(child_id)
                first, last = max(start, offset) - offset, min(stop, end) - offset
                self._collect(child, end - offset, first, last, out)

    # -- changing ---------------------------------------------------------------------------

    def insert(self, position: int, item: Any) -> None:
        """In a list: insert ``item`` before ``position`` (``0 <= position <= len``)."""
        appending = position == len(self)
        path, leaf_id, local = self._descend(position, inserting=True)
        self._node(leaf_id)["items"].insert(local, item)
        self._resized(path, leaf_id, 1, appending)

    def insert_sorted(self, item: list[Any]) -> None:
        """In a sorted tree: insert ``[key, value]`` after the items with an equal key."""
        path, leaf_id, local = self._descend_key(item[0], right=True)
        items = self._node(leaf_id)["items"]
        appending = local == len(items) and all(
            slot == len(self._node(node_id)["children"]) - 1 for node_id, slot in path
        )
        items.insert(local, item)
        self._resized(path, leaf_id, 1, appending)

    def replace(self, position: int, item: Any) -> Any:
        """In a list: put ``item`` at ``position`` in place of the item there, returned."""
        _path, leaf_id, local = self._descend(position)
        items = self._node(leaf_id)["items"]
        old, items[local] = items[local], item
        self._changed.add(leaf_id)
        return old

    def pop(self, position: int) -> Any:
        """In a list: remove and return the item at ``position``."""
        path, leaf_id, local = self._descend(position)
        item = self._node(leaf_id)["items"].pop(local)
        self._resized(path, leaf_id, -1)
        return item

    def remove_first(self, key: Any, match: Callable[[Any], bool]) -> Any:
        """In a sorted tree: remove and return the first item with this key that ``match``
        accepts, or None."""
        for path, leaf_id, local in self._scan(key):
            items = self._node(leaf_id)["items"]
            if _item_rank(items[local]) != _rank(key):
                return None
            if match(items[local]):
                item = items.pop(local)
                self._resized(list(path), leaf_id, -1)
                return item
        return None

    def flush(self) -> None:
        """Write the changed nodes and the header into the prefix's transaction."""
        for node_id in sorted(self._changed - {_HEADER}):
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
            if node_id != _HEADER:
                del self._px[self._node_key(node_id)]
        return items

    # -- invariants -------------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``AssertionError`` unless the tree is well formed: sizes, labels, key order,
        node fill, all leaves at one depth, and no node record outside the tree. For tests and
        stress runs (it reads every node and every key of the prefix)."""
        reachable: set[int] = set()
        total, _depth, _low, _high = self._check_node(self._root_id(), reachable)
        assert total == len(self), f"size {len(self)}, items {total}"
        start = f"{NODE}{self.key}/"
        stored = {
            int(key[len(start) :])
            for key in self._px
            if key.startswith(start) and key[len(start) :].isdigit()
        }
        assert stored == reachable - {_HEADER}, f"node records {sorted(stored)}, tree {reachable}"

    def _check_node(self, node_id: int, reachable: set[int]) -> tuple[int, int, Any, Any]:
        """(items, height, lowest key rank, highest key rank) of a subtree, checked."""
        reachable.add(node_id)
        node = self._node(node_id)
        entries = _entries(node)
        root = node_id == self._root_id()
        if not root:
            assert 0 < len(entries) <= NODE_MAX, f"node {node_id} holds {len(entries)}"
        if "items" in node:
            if not (self._keyed and entries):
                return len(entries), 0, None, None
            ranks = [_item_rank(item) for item in entries]
            assert ranks == sorted(ranks), f"items of node {node_id} out of key order"
            return len(entries), 0, ranks[0], ranks[-1]
        assert 2 <= len(entries) <= NODE_MAX or not root, "root size"
        total, heights, low, high = 0, set(), None, (False, None)
        for slot, (child_id, label) in enumerate(entries):
            assert 0 < child_id < self.header.get("next", 1), f"node id {child_id}"
            count, height, child_low, child_high = self._check_node(child_id, reachable)
            if not self._keyed:
                assert label == total, f"offset of node {child_id}: {label}, not {total}"
            elif slot:
                assert high <= _rank(label) <= child_low, f"first key of node {child_id}"
            else:
                low = child_low
            total, high = total + count, child_high
            heights.add(height)
        assert len(heights) == 1, f"leaves at several depths under node {node_id}"
        return total, heights.pop() + 1, low, high

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
        stack = [(self._root_id(), 0)]
        while stack:
            node_id, depth = stack.pop()
            node = self._node(node_id)
            out.append((node_id, node, depth))
            if "children" in node:
                stack.extend((child[0], depth + 1) for child in reversed(node["children"]))
        return out

    def _descend(self, position: int, *, inserting: bool = False) -> tuple[Path, int, int]:
        """In a list: the path to the leaf holding ``position``, that leaf's id and the
        position in it. Inserting at a boundary between two children goes to the left one,
        so that an append goes to the last leaf."""
        path = []
        node_id = self._root_id()
        node = self._node(node_id)
        while "children" in node:
            children = node["children"]
            if inserting:
                slot = max(bisect.bisect_left(children, position, key=_label) - 1, 0)
            else:
                slot = bisect.bisect_right(children, position, key=_label) - 1
            position -= children[slot][1]
            path.append((node_id, slot))
            node_id = children[slot][0]
            node = self._node(node_id)
        return path, node_id, position

    def _descend_key(self, key: Any, *, right: bool) -> tuple[Path, int, int]:
        """In a sorted tree: the path to the leaf where ``key`` goes, that leaf's id and the
        position in it, after the equal keys (``right``) or before them."""
        find = bisect.bisect_right if right else bisect.bisect_left
        rank = _rank(key)
        path = []
        node_id = self._root_id()
        node = self._node(node_id)
        while "children" in node:
            children = node["children"]
            slot = find(children, rank, lo=1, key=lambda child: _rank(child[1])) - 1
            path.append((node_id, slot))
            node_id = children[slot][0]
            node = self._node(node_id)
        return path, node_id, find(node["items"], rank, key=_item_rank)

    def _scan(self, key: Any) -> Iterator[tuple[Path, int, int]]:
        """In a sorted tree: where each item with a key ``>= key`` is, in order."""
        path, leaf_id, start = self._descend_key(key, right=False)
        while True:
            for local in range(start, len(self._node(leaf_id)["items"])):
                yield path, leaf_id, local
            # The next leaf: up to the nearest node with a child after ours, then down its left.
            while path and path[-1][1] == len(self._node(path[-1][0])["children"]) - 1:
                path.pop()
            if not path:
                return
            node_id, slot = path.pop()
            path.append((node_id, slot + 1))
            leaf_id = self._node(node_id)["children"][slot + 1][0]
            while "children" in self._node(leaf_id):
                path.append((leaf_id, 0))
                leaf_id = self._node(leaf_id)["children"][0][0]
            start = 0

    def _resized(self, path: Path, leaf_id: int, delta: int, appending: bool = False) -> None:
        """A leaf gained or lost ``delta`` items: move the offsets after it, then rebalance."""
        self._changed.add(leaf_id)
        if "root" in self.header:
            self.header["size"] += delta
        if not self._keyed:
            for node_id, slot in path:
                later = self._node(node_id)["children"][slot + 1 :]
                for entry in later:
                    entry[1] += delta
                if later:
                    self._changed.add(node_id)
        node_id = leaf_id
        while path:
            parent_id, slot = path.pop()
            parent = self._node(parent_id)
            entries = _entries(self._node(node_id))
            if len(entries) > NODE_MAX:
                self._split(parent, slot, appending)
            elif not entries:
                self._drop(parent["children"].pop(slot)[0])  # the offsets after it hold
            elif len(entries) >= NODE_MAX // 4 or not self._merge(parent, slot):
                return  # no node above changes
            self._changed.add(parent_id)
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
        children = parent["children"]
        child_id, offset = children[slot]
        child = self._node(child_id)
        kind = "items" if "items" in child else "children"
        entries = child[kind]
        pieces = -(-len(entries) // NODE_MAX)
        step = NODE_MAX if appending else -(-len(entries) // pieces)
        child[kind] = entries[:step]
        self._changed.add(child_id)
        for at in range(step, len(entries), step):
            node = {kind: entries[at : at + step]}
            if self._keyed:  # its first key (a first child's label is valid: it was not first)
                label = node[kind][0][0] if kind == "items" else node[kind][0][1]
            else:
                before = at if kind == "items" else node[kind][0][1]  # items before it
                if kind == "children":
                    for entry in node[kind]:
                        entry[1] -= before
                label = offset + before
            slot += 1
            children.insert(slot, [self._create(node), label])

    def _merge(self, parent: dict[str, Any], slot: int) -> bool:
        """Merge the underfull child at ``slot`` into a neighbour if both fit in one node;
        whether it did. One that does not fit has a neighbour over 3/4 full, so the pair is at
        least half full."""
        children = parent["children"]
        if len(children) < 2:
            return False  # an only child: its parent is underfull too, and handled above
        left = slot - 1 if slot > 0 else slot
        (left_id, left_label), (right_id, right_label) = children[left], children[left + 1]
        left_node, right_node = self._node(left_id), self._node(right_id)
        moved = _entries(right_node)
        if len(_entries(left_node)) + len(moved) > NODE_MAX:
            return False
        if "children" in right_node and self._keyed:
            moved[0][1] = right_label  # its first child's label was unused; now it bounds it
        elif "children" in right_node:
            for entry in moved:
                entry[1] += right_label - left_label  # after the left node's items
        _entries(left_node).extend(moved)
        del children[left + 1]
        self._changed.add(left_id)
        self._drop(right_id)
        return True

    def _fix_root(self, appending: bool) -> None:
        """Grow the tree by a level while the root overflows; shrink it while the root is an
        internal node with one child (or none). A root leaf lives in the header."""
        while True:
            root_id = self._root_id()
            entries = _entries(self._node(root_id))
            if len(entries) > NODE_MAX:
                if root_id == _HEADER:
                    self.header["size"] = len(entries)
                    root_id = self._create({"items": self.header.pop("items")})
                new_root = {"children": [[root_id, None if self._keyed else 0]]}
                self.header["root"] = self._create(new_root)
                self._split(new_root, 0, appending)
            elif root_id != _HEADER and len(entries) <= 1:
                self._drop(root_id)
                leaf: dict[str, Any] = {"items": []}
                if entries:
                    child_id = entries[0][0]
                    if "children" in self._node(child_id):
                        self.header["root"] = child_id
                        continue
                    leaf = self._node(child_id)
                    self._drop(child_id)
                del self.header["root"], self.header["size"]
                self.header["items"] = leaf["items"]  # one leaf left: back in the header
            else:
                return

    def _root_id(self) -> int:
        root: int = self.header.get("root", _HEADER)
        return root

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
                if tree.find(uuid) is None:
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
                tree.remove_first(uuid, lambda _item: True)
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
