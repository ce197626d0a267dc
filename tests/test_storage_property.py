"""Property test: random put/delete/commit/rollback/checkpoint/reopen sequences agree with a
plain dict model — the writer sees committed + pending state, a second repository object's
read-only view sees exactly the committed state without reopening, and a reopened repository
recovers exactly the committed state."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from hotcopy.storage import Repository, verify_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(90)

KEYS = st.sampled_from(["a", "b", "c", "d", "", "é", "\U0001f389x", "k" * 40])
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)  # NaN and Infinity are refused
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=8),  # so are lone surrogates
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
VALUES = JSON | st.binary(max_size=300)

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), KEYS, VALUES),
        st.tuples(st.just("delete"), KEYS),
        st.tuples(st.just("commit")),
        st.tuples(st.just("rollback")),
        st.tuples(st.just("checkpoint")),
        st.tuples(st.just("reopen")),
    ),
    min_size=5,
    max_size=50,
)


class _World:
    """The store under test next to its model."""

    def __init__(self, root: Path, checkpoint_bytes: int) -> None:
        self.root = root
        self.checkpoint_bytes = checkpoint_bytes
        Repository.init(root).close()
        self.committed: dict[str, Any] = {}
        self.pending: dict[str, Any] = {}
        self.seq = 0
        self._open()

    def _open(self) -> None:
        self.repo = Repository(self.root, checkpoint_bytes=self.checkpoint_bytes)
        self.px = self.repo.open_prefix("p", "rw")
        self.watcher_repo = Repository(self.root)
        self.watcher = self.watcher_repo.open_prefix("p", "r")

    def close(self) -> None:
        self.repo.close()
        self.watcher_repo.close()

    def step(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "put":
            self.px[op[1]] = op[2]
            self.pending[op[1]] = op[2]
        elif kind == "delete":
            if op[1] in self.pending:
                del self.px[op[1]]
                del self.pending[op[1]]
            else:
                with pytest.raises(KeyError):
                    del self.px[op[1]]
        elif kind == "commit":
            changed = self.pending != self.committed
            seq = self.px.commit()
            self.committed = dict(self.pending)
            if seq != self.seq:
                assert seq == self.seq + 1
            else:
                assert not changed
            self.seq = seq
        elif kind == "rollback":
            self.px.rollback()
            self.pending = dict(self.committed)
        elif kind == "checkpoint":
            cut = self.px.checkpoint()  # pending changes stay pending
            assert cut.seq == self.seq
            report = verify_file(self.root / "p.hc")
            assert report.ok and report.seq == self.seq and report.size == cut.length
            assert report.keys == len(self.committed)
        elif kind == "reopen":
            self.close()  # rolls back what is pending
            self.pending = dict(self.committed)
            self._open()
        self.check()

    def check(self) -> None:
        assert list(self.px) == sorted(self.pending)
        assert len(self.px) == len(self.pending)
        for key, value in self.pending.items():
            assert self.px[key] == value
        assert list(self.watcher) == sorted(self.committed)
        assert dict(self.watcher.items()) == self.committed
        assert self.watcher.seq == self.seq


@settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS, checkpoint_bytes=st.sampled_from([1 << 30, 600]))
def test_random_operations_agree_with_a_dict_model(
    tmp_path: Path, ops: list[tuple[Any, ...]], checkpoint_bytes: int
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        world = _World(Path(scratch) / "repo", checkpoint_bytes)
        try:
            for op in ops:
                world.step(op)
            world.close()
            world.pending = dict(world.committed)
            world._open()
            world.check()
        finally:
            world.close()
