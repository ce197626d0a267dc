"""The object layer in one process: @memo classes, scoping, references and their counts, weak
proxies, enums, tags, containers, commit of every touched prefix, and objects through reopen,
copy_prefix and restore_prefix. Real files and real prefixes throughout."""

from __future__ import annotations

import builtins
import copy
import gc
import pickle
from pathlib import Path
from typing import Any

import hotcopy.storage as hc
import pytest

pytestmark = pytest.mark.timeout(60)


# -- classes shared by the tests (module level: loadable again after a reopen) -------------------


@hc.memo
class Thing:
    kind = "plain"  # a class attribute: the default until an instance sets its own

    def __init__(self, name: str, **attrs: Any) -> None:
        self.name = name
        for key, value in attrs.items():
            setattr(self, key, value)

    def shout(self) -> str:
        return self.name.upper()

    @property
    def label(self) -> str:
        return f"<{self.name}>"

    @label.setter
    def label(self, text: str) -> None:
        self.name = text.strip("<>")


@hc.memo(prefix="settings")
class Settings:
    def __init__(self, theme: str) -> None:
        self.theme = theme


@hc.memo(singleton=True)
class Config:
    def __init__(self, level: int) -> None:
        self.level = level


@hc.memo
class Scoped:
    def __init__(self, name: str, prefix: str) -> None:
        hc.set_prefix(self, prefix)
        self.name = name


@hc.memo
class Late:
    def __init__(self, prefix: str) -> None:
        self.first = 1
        hc.set_prefix(self, prefix)


@hc.memo
class Special(Thing):
    pass


@hc.enum(values=["ADMIN", "USER", "GUEST"], prefix="roles")
class Role:
    pass


def record_key(obj: Any) -> str:
    """The key of ``obj``'s record on its prefix (the uuid names the prefix, the key does not)."""
    return "obj/" + hc.uuid(obj).rpartition(":")[2]


def reopen(root: Path) -> hc.Repository:
    """Close the repository (every prefix) and open it again, with "main" current."""
    hc.commit()
    hc.close()
    repo = hc.init(root)
    hc.open("main", "rw")
    return repo


# -- attributes --------------------------------------------------------------------------------


VALUES: dict[str, Any] = {
    "none": None,
    "flag": True,
    "count": 2**70,
    "ratio": -0.25,
    "text": "héllo \U0001f389",
    "blob": b"\x00\xffraw",
    "nested": {"$ref": "not a reference", "list": [1, {"b": b"x"}], "": None},
    "items": [1, "two", [3.0], {"$dict": 4}],
}


def test_attributes_of_every_storable_type_survive_a_reopen(root: Path) -> None:
    thing = Thing("t", **VALUES)
    for key, value in VALUES.items():
        assert getattr(thing, key) == value  # pending changes read back at once
    uid = hc.uuid(thing)
    reopen(root)
    loaded = hc.fetch(Thing, uid)
    for key, value in VALUES.items():
        assert getattr(loaded, key) == value
        assert type(getattr(loaded, key)) is type(value)
    assert loaded.name == "t" and hc.uuid(loaded) == uid


def _nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _nested_tuples(levels: int) -> tuple[Any, ...]:
    value: tuple[Any, ...] = ()
    for _ in range(levels - 1):
        value = (value,)
    return value


def test_values_nested_up_to_the_limit_survive_a_reopen(root: Path) -> None:
    deepest = {"$dict": _nested(255)}  # 256 levels, the dict included
    tuples = _nested_tuples(128)  # as deep: two levels each
    thing = Thing("t", deep=deepest, tuples=tuples)
    uid = hc.uuid(thing)
    reopen(root)
    assert hc.fetch(Thing, uid).deep == deepest
    assert hc.fetch(Thing, uid).tuples == tuples


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ((1, object()), TypeError),
        ({1, frozenset({object()})}, TypeError),
        (object(), TypeError),
        ({1: "x"}, TypeError),
        (float("nan"), ValueError),
        ([b"ok", (1, {"x": [object()]})], TypeError),
        ({"a": [float("inf")]}, ValueError),
        ("lone \udcff", ValueError),
        ({"lone \ud800": 1}, ValueError),
        (_nested(257), ValueError),
        (_nested_tuples(129), ValueError),  # a tuple is stored as two levels
        (_nested(60_000), ValueError),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else type(v).__name__,
)
def test_unstorable_values_are_refused_and_change_nothing(
    root: Path, value: Any, error: type[Exception]
) -> None:
    thing = Thing("t", kept=1)
    with pytest.raises(error):
        thing.kept = value
    assert thing.kept == 1


def test_methods_properties_defaults_and_deletion(root: Path) -> None:
    thing = Thing("ann")
    assert thing.shout() == "ANN"
    assert thing.kind == "plain"  # the class default
    thing.kind = "special"
    assert thing.kind == "special" and Thing.kind == "plain"
    thing.label = "<bob>"  # a property setter stores through to the record
    assert thing.name == "bob" and thing.label == "<bob>"
    with pytest.raises(TypeError, match="method"):
        thing.shout = "no"
    assert not hasattr(thing, "missing")
    thing.extra = 5
    del thing.extra
    assert not hasattr(thing, "extra")
    with pytest.raises(AttributeError):
        del thing.extra
    assert "_hc_state" in thing.__dict__ and "name" not in thing.__dict__  # nothing in memory


def test_persisted_objects_are_not_copied_or_pickled(root: Path) -> None:
    thing = Thing("t")
    for obj in (thing, hc.list(), hc.index(), hc.weak_proxy(thing)):
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="uuid"):
                attempt(obj)
    assert pickle.loads(pickle.dumps(Role.ADMIN)) is Role.ADMIN  # enum values are plain values


def test_a_class_that_manages_its_own_attributes_cannot_be_memo() -> None:
    with pytest.raises(TypeError, match="__setattr__"):

        @hc.memo
        class Custom:
            def __setattr__(self, name: str, value: Any) -> None:
                pass

    class Base:
        pass

    with pytest.raises(TypeError, match="not a @memo class"):
        hc.fetch(Base, "x")


def test_an_undecorated_subclass_is_refused(root: Path) -> None:
    class Sub(Thing):
        pass

    with pytest.raises(TypeError, match="decorate the subclass"):
        Sub("x")
    assert isinstance(Special("s"), Thing)


# -- scoping -----------------------------------------------------------------------------------


def test_scoped_instances_go_to_their_prefix_and_leave_the_current_one(root: Path) -> None:
    settings = Settings("dark")
    thing = Thing("here")
    assert hc.get_prefix_of(settings).name == "settings"
    assert hc.get_prefix_of(Settings).name == "settings"
    assert hc.get_prefix_of(thing).name == "main"
    assert hc.get_prefix_of(Thing).name == "main"  # unscoped class: the current prefix
    assert hc.get_current_prefix().name == "main"
    hc.open("other", "rw")
    assert hc.get_prefix_of(Settings("light")).name == "settings"
    assert hc.get_prefix_of(Thing("there")).name == "other"


def test_set_prefix_places_the_object_and_must_come_first(root: Path) -> None:
    scoped = Scoped("a", "client_x")
    assert hc.get_prefix_of(scoped).name == "client_x"
    with pytest.raises(hc.ScopeError, match="first statement") as caught:
        Late("client_y")
    assert isinstance(caught.value, RuntimeError)
    with pytest.raises(hc.ScopeError, match="too late"):
        hc.set_prefix(scoped, "elsewhere")  # after __init__

    @hc.memo(prefix="fixed")
    class Fixed:
        def __init__(self) -> None:
            hc.set_prefix(self, "moved")

    with pytest.raises(hc.ScopeError, match="fixed"):
        Fixed()
    with pytest.raises(hc.InvalidPrefixName):
        Scoped("b", "../escape")


def test_an_unscoped_object_needs_a_current_prefix(tmp_path: Path) -> None:
    hc.init(tmp_path / "repo")
    try:
        with pytest.raises(RuntimeError, match="set_prefix"):
            Thing("nowhere")
        assert hc.get_prefix_of(Settings("ok")).name == "settings"  # scoped: no current needed
    finally:
        hc.close()


def test_init_that_raises_leaves_nothing_behind(root: Path) -> None:
    @hc.memo(singleton=True)
    class Fragile:
        def __init__(self, fail: bool) -> None:
            self.x = 1
            if fail:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Fragile(True)
    assert [key for key in hc.get_current_prefix() if key.startswith(("obj/", "single"))] == []
    made = Fragile(False)  # the singleton slot was freed
    assert hc.fetch(Fragile) is made


# -- fetch, singletons, uuids ------------------------------------------------------------------


def test_singletons_are_one_per_prefix(root: Path) -> None:
    with pytest.raises(hc.ObjectNotFound, match=r"Config\(\.\.\.\)") as missing:
        hc.fetch(Config)
    assert isinstance(missing.value, KeyError)
    config = Config(3)
    assert hc.fetch(Config) is config
    with pytest.raises(hc.SingletonExists, match="fetch"):
        Config(4)
    hc.open("second", "rw")
    assert hc.fetch(Config, prefix="main") is config
    other = Config(9)  # a singleton per prefix
    assert hc.fetch(Config) is other and hc.fetch(Config, prefix="main") is config
    uid = hc.uuid(config)
    del config, other
    hc.commit()  # singletons stay though no handle or reference keeps them
    reopen(root)
    assert hc.uuid(hc.fetch(Config)) == uid and hc.fetch(Config).level == 3
    with pytest.raises(TypeError, match="singleton"):
        hc.fetch(Thing)


def test_fetch_by_uuid_checks_prefix_and_class(root: Path) -> None:
    thing = Thing("t")
    uid = hc.uuid(thing)
    assert hc.fetch(Thing, uid) is thing  # one Python object per stored object
    with pytest.raises(TypeError, match="not a Settings"):
        hc.fetch(Settings, uid, prefix="main")
    with pytest.raises(hc.ObjectNotFound, match="prefix"):
        hc.fetch(Thing, uid, prefix="elsewhere")
    with pytest.raises(hc.ObjectNotFound):
        hc.fetch(Thing, "0" * 32)
    with pytest.raises(TypeError, match="not a persisted object"):
        hc.uuid(object())


# -- references and lifetime -------------------------------------------------------------------


def test_strong_references_are_counted_and_keep_their_target(root: Path) -> None:
    parent, child = Thing("parent"), Thing("child")
    parent.child = child
    parent.pair = [child, {"again": child}]  # references inside plain values count too
    assert hc.getrefcount(child) == 3 and hc.getrefcount(parent) == 0
    parent.pair = None
    assert hc.getrefcount(child) == 1
    parent.child = child  # the same object again: gained before lost, never dropped
    assert hc.getrefcount(child) == 1
    child_id = hc.uuid(child)
    del child
    hc.commit()
    assert parent.child.name == "child"  # kept by the reference
    del parent.child
    hc.commit()  # the last reference went and no handle holds it: deleted with that change
    with pytest.raises(hc.ObjectNotFound):
        hc.fetch(Thing, child_id)


def test_an_object_is_deleted_at_the_commit_after_its_last_handle_goes(root: Path) -> None:
    a, b, c = Thing("a"), Thing("b"), Thing("c")
    a.next, b.next = b, c
    ids = [hc.uuid(x) for x in (a, b, c)]
    hc.commit()
    del b, c
    kept = Thing("kept")
    hc.tags(kept).add("keep")  # tags keep an object alive
    kept_id = hc.uuid(kept)
    del a, kept
    gc.collect()
    assert all(hc.fetch(Thing, i) for i in ids)  # nothing is deleted before the commit
    hc.commit()
    for uid in ids:  # a, then what only a kept alive (b), then what only b kept (c)
        with pytest.raises(hc.ObjectNotFound):
            hc.fetch(Thing, uid)
    assert hc.fetch(Thing, kept_id).name == "kept"


def test_many_dropped_handles_are_all_collected(root: Path) -> None:
    keep = Thing("keep", box=hc.list())
    for number in range(1500):  # past the identity map's first sweep
        Thing(f"t{number}", nested={"n": number})
        if number % 500 == 0:
            keep.box.append(number)
    hc.commit()
    stored = [key for key in hc.get_current_prefix() if key.startswith("obj/")]
    assert sorted(stored) == sorted([record_key(keep), record_key(keep.box)])
    assert list(keep.box) == [0, 500, 1000]


def test_a_strong_reference_across_prefixes_is_an_error_naming_both(root: Path) -> None:
    here, there = Thing("here"), Settings("dark")
    for attempt in (
        lambda: setattr(here, "ref", there),
        lambda: setattr(here, "refs", [1, {"deep": there}]),
        lambda: setattr(here, "box", hc.list([there])),
    ):
        with pytest.raises(hc.CrossPrefixReference) as caught:
            attempt()
        assert isinstance(caught.value, ValueError)
        message = str(caught.value)
        assert "'main'" in message and "'settings'" in message and "weak_proxy" in message
        assert caught.value.source_prefix == "main" and caught.value.target_prefix == "settings"
    assert not hasattr(here, "ref") and hc.getrefcount(there) == 0


def test_weak_proxies_pass_through_and_do_not_count(root: Path) -> None:
    here, there = Thing("here"), Settings("dark")
    here.settings = hc.weak_proxy(there)
    assert here.settings.theme == "dark"
    here.settings.theme = "light"  # writes pass through too
    assert there.theme == "light"
    assert hc.getrefcount(there) == 0 and hc.getrefcount(here.settings) == 0
    assert hc.uuid(here.settings) == hc.uuid(there)
    assert hc.get_prefix_of(here.settings).name == "settings"
    assert here.settings == hc.weak_proxy(there) and not hc.expired(here.settings)
    here.near = hc.weak_proxy(Thing("near"))  # a proxy within one prefix is fine too
    with pytest.raises(TypeError):
        hc.expired(there)
    hc.tags(here).add("here")
    uid = hc.uuid(there)
    reopen(root)  # nothing keeps `there` but this test's handle: still there after the commit
    (loaded,) = hc.find(Thing, "here")
    assert loaded.settings.theme == "light" and hc.uuid(loaded.settings) == uid


def test_an_expired_proxy_raises_reference_error_but_keeps_its_uuid(root: Path) -> None:
    holder, target = Thing("holder"), Settings("gone")
    holder.link = hc.weak_proxy(target)
    uid = hc.uuid(target)
    del target
    assert not hc.expired(holder.link)  # deleted only at the commit
    hc.commit()
    assert hc.expired(holder.link)
    with pytest.raises(hc.ReferenceError, match="expired") as caught:
        _ = holder.link.theme
    assert isinstance(caught.value, builtins.ReferenceError)
    assert isinstance(caught.value, hc.StorageError)
    assert hc.uuid(holder.link) == uid


# -- enums and tags ----------------------------------------------------------------------------


def test_enums_are_scoped_values(root: Path) -> None:
    assert [value.name for value in Role] == ["ADMIN", "USER", "GUEST"] and len(Role) == 3
    assert Role.ADMIN is Role.ADMIN and Role.ADMIN != Role.USER and Role.ADMIN in Role
    assert repr(Role.ADMIN) == "Role.ADMIN" and str(Role.GUEST) == "GUEST"
    assert {Role.ADMIN: 1}[Role.ADMIN] == 1
    assert hc.get_prefix_of(Role.USER).name == "roles" == hc.get_prefix_of(Role).name
    with pytest.raises(AttributeError):
        _ = Role.NOBODY
    with pytest.raises(AttributeError):
        Role.ADMIN.name = "x"
    for bad in (["A", "A"], ["not valid"], [], ["_hidden"]):
        with pytest.raises(ValueError):
            hc.enum(values=bad)(type("E", (), {}))
    thing = Thing("t", role=Role.ADMIN, roles=[Role.USER, Role.GUEST])
    uid = hc.uuid(thing)
    reopen(root)
    loaded = hc.fetch(Thing, uid)
    assert loaded.role is Role.ADMIN and loaded.roles == [Role.USER, Role.GUEST]


def test_tags_add_remove_and_find(root: Path) -> None:
    a, b, c = Thing("a"), Thing("b"), Special("c")
    hc.tags(a).add("red", Role.ADMIN)
    hc.tags(b).add("red")
    hc.tags(c).add("red", Role.ADMIN)
    hc.tags(a).add("red")  # again: no change
    assert "red" in hc.tags(a) and Role.ADMIN in hc.tags(a) and "blue" not in hc.tags(a)
    assert list(hc.tags(a)) == ["red", Role.ADMIN] and len(hc.tags(b)) == 1
    assert hc.find(Thing, "red") == [a, b, c]
    assert hc.find(Thing, "red", Role.ADMIN) == [a, c]
    assert hc.find(Special, "red") == [c]  # instances of the class (subclasses included)
    assert hc.find(Thing, "blue") == []
    hc.tags(a).remove("red", "never-had")
    assert hc.find(Thing, "red") == [b, c]
    hc.tags(b).remove("red")
    hc.tags(c).remove("red")
    assert "tag/s:red" not in hc.get_current_prefix()  # an empty tag leaves no key behind
    with pytest.raises(TypeError):
        hc.tags(a).add(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a class or a tag"):
        hc.find()
    settings = Settings("x")
    hc.tags(settings).add("mine")
    hc.open("elsewhere", "rw")
    assert hc.find(Settings, "mine") == [settings]  # looked up on the class's prefix
    assert hc.find(Thing, Role.ADMIN, prefix="main") == [a, c]
    reopen(root)
    assert [t.name for t in hc.find(Thing, Role.ADMIN)] == ["a", "c"]


# -- containers --------------------------------------------------------------------------------


def test_list_is_a_persisted_mutable_sequence(root: Path) -> None:
    items = hc.list([1, "two"])
    items.append(b"three")
    items.extend([None, 5])
    items.insert(0, 0)
    items[1] = 10
    del items[-1]
    assert list(items) == [0, 10, "two", b"three", None] and len(items) == 5
    assert items[1:3] == [10, "two"] and items.index("two") == 2 and items == items
    assert items.count(None) == 1 and "two" in items and 99 not in items
    items[0:2] = ["a", "b", "c"]
    assert items == ["a", "b", "c", "two", b"three", None]
    member = Thing("member")
    items.append(member)
    assert hc.getrefcount(member) == 1 and items[-1] is member
    items.pop()
    assert hc.getrefcount(member) == 0
    holder = Thing("holder", items=items)
    assert holder.items is items and hc.getrefcount(items) == 1
    assert hc.get_prefix_of(items).name == "main"
    uid = hc.uuid(holder)
    reopen(root)
    assert list(hc.fetch(Thing, uid).items) == ["a", "b", "c", "two", b"three", None]
    assert isinstance(hc.fetch(Thing, uid).items, hc.MemoList)


def test_index_keeps_keys_in_order_with_ranges(root: Path) -> None:
    idx = hc.index()
    for key, value in [(3, "c"), (1, "a"), (2, "b"), (2, "b2"), (0.5, "half")]:
        idx.add(key, value)
    assert list(idx) == ["half", "a", "b", "b2", "c"]  # equal keys keep insertion order
    assert idx.keys() == [0.5, 1, 2, 2, 3] and len(idx) == 5 and idx
    assert idx.range(1, 3) == ["a", "b", "b2"]  # lo <= key < hi
    assert idx.range(2) == ["b", "b2", "c"] and idx.range(None, 1) == ["half"]
    assert idx.items(2, 3) == [(2, "b"), (2, "b2")]
    idx.remove(2, "b")
    with pytest.raises(KeyError):
        idx.remove(2, "zzz")
    with pytest.raises(TypeError, match="numbers"):
        idx.add("x", 1)
    with pytest.raises(TypeError):
        idx.add(True, 1)
    with pytest.raises(ValueError):
        idx.add(float("nan"), 1)
    member = Thing("member")
    idx.add(9, member)
    assert hc.getrefcount(member) == 1 and idx.range(9) == [member]
    holder = Thing("holder", idx=idx)
    uid = hc.uuid(holder)
    reopen(root)
    loaded = hc.fetch(Thing, uid).idx
    assert loaded.range(None, 9) == ["half", "a", "b2", "c"]
    assert loaded.range(9)[0].name == "member"
    words = hc.index()
    for word in ["pear", "apple", "fig"]:
        words.add(word, len(word))
    assert words.keys() == ["apple", "fig", "pear"] and words.range("b", "g") == [3]


def test_auto_hardening_moves_only_empty_unreferenced_containers(root: Path) -> None:
    empty = hc.list()
    settings = Settings("dark")
    settings.history = empty
    assert hc.get_prefix_of(empty).name == "settings" and hc.getrefcount(empty) == 1
    assert record_key(empty) not in hc.get_current_prefix()
    referenced = hc.index()
    Thing("owner", idx=referenced)  # referenced on "main" (and the owner is not dropped yet)
    with pytest.raises(hc.CrossPrefixReference, match="non-empty or referenced"):
        settings.idx = referenced
    full = hc.list([1])
    with pytest.raises(hc.CrossPrefixReference):
        settings.items = full
    assert hc.get_prefix_of(referenced).name == "main" == hc.get_prefix_of(full).name
    uid = hc.uuid(settings)
    reopen(root)
    assert list(hc.fetch(Settings, uid).history) == []


# -- commit, reopen, copy and restore ----------------------------------------------------------


def test_commit_commits_every_touched_prefix(root: Path) -> None:
    settings = Settings("dark")
    scoped = Scoped("s", "client_a")
    thing = Thing("t")
    seq = hc.commit()
    assert seq == hc.get_current_prefix().seq == 1
    ids = hc.uuid(settings), hc.uuid(scoped), hc.uuid(thing)
    hc.close()
    hc.init(root)
    hc.open("main", "r")
    assert hc.fetch(Settings, ids[0]).theme == "dark"
    assert hc.fetch(Scoped, ids[1], prefix="client_a").name == "s"
    assert hc.fetch(Thing, ids[2]).name == "t"
    hc.close()
    with pytest.raises(RuntimeError, match="no prefix is open"):
        hc.commit()


def test_handles_of_a_closed_repository_refuse_to_work(root: Path) -> None:
    thing = Thing("t")
    hc.commit()
    hc.close()
    with pytest.raises(hc.ClosedError):
        _ = thing.name
    hc.init(root)
    hc.open("main", "rw")
    fresh = Thing("fresh")
    with pytest.raises(hc.StorageError, match="closed or re-opened"):
        fresh.old = thing


def _holder_and_target() -> tuple[Any, Any]:
    holder = Scoped("doc", "docs")
    target = Scoped("user", "users")
    holder.author = hc.weak_proxy(target)
    hc.tags(holder).add("doc")
    hc.tags(target).add("user")
    return holder, target


def test_copy_of_a_prefix_carries_its_objects_and_nothing_else(root: Path, tmp_path: Path) -> None:
    holder, _target = _holder_and_target()
    child = Scoped("child", "docs")
    holder.child = child
    hc.commit()
    copy = tmp_path / "docs.copy"
    hc.copy_prefix(copy, prefix="docs")
    hc.close()
    other = hc.init(tmp_path / "other")
    other.restore_prefix(copy, "docs")
    hc.open("docs", "rw")
    assert other.prefixes() == ["docs"]
    (loaded,) = hc.find(Scoped, "doc")
    assert loaded.name == "doc" and loaded.child.name == "child"
    assert hc.expired(loaded.author)  # its target's prefix is not in this repository
    with pytest.raises(hc.ReferenceError):
        _ = loaded.author.name


def test_restoring_the_target_side_expires_proxies_without_breaking(
    root: Path, tmp_path: Path
) -> None:
    repo = hc.init(root)
    hc.open("main", "rw")
    repo.open_prefix("users", "rw")  # the prefix exists before any user
    before = tmp_path / "users.before"
    hc.copy_prefix(before, prefix="users")
    holder, target = _holder_and_target()
    hc.commit()
    after = tmp_path / "users.after"
    hc.copy_prefix(after, prefix="users")
    repo.restore_prefix(before, "users", force=True)
    assert hc.expired(holder.author)
    with pytest.raises(hc.ReferenceError):
        _ = holder.author.name
    with pytest.raises(hc.ReferenceError, match="restored"):
        _ = target.name  # the direct handle finds its record gone too
    assert holder.name == "doc"  # the other prefix is untouched
    with pytest.raises(hc.ObjectNotFound):
        hc.fetch(Scoped, hc.uuid(target), prefix="users")  # though this process holds it
    with pytest.raises(hc.ReferenceError):
        Scoped("other", "users").friend = target  # no reference to what is gone
    hc.commit()  # (a restore waits for no transaction of ours)
    repo.restore_prefix(after, "users", force=True)
    assert not hc.expired(holder.author) and holder.author.name == "user"
    assert target.name == "user"


def test_restoring_the_source_side_restores_its_links(root: Path, tmp_path: Path) -> None:
    repo = hc.init(root)
    hc.open("main", "rw")
    holder = Scoped("doc", "docs")
    hc.tags(holder).add("doc")
    hc.commit()
    plain = tmp_path / "docs.plain"
    hc.copy_prefix(plain, prefix="docs")
    target = Scoped("user", "users")
    hc.tags(target).add("user")
    holder.author = hc.weak_proxy(target)
    hc.commit()
    linked = tmp_path / "docs.linked"
    hc.copy_prefix(linked, prefix="docs")
    repo.restore_prefix(plain, "docs", force=True)
    assert not hasattr(holder, "author")
    repo.restore_prefix(linked, "docs", force=True)
    assert holder.author.name == "user" and not hc.expired(holder.author)
    target.name = "renamed"
    hc.commit()
    assert holder.author.name == "renamed"


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (hc.CrossPrefixReference, ValueError),
        (hc.ObjectNotFound, KeyError),
        (hc.ReferenceError, builtins.ReferenceError),
        (hc.ScopeError, RuntimeError),
        (hc.SingletonExists, ValueError),
        (hc.EnumRedefined, ValueError),
    ],
)
def test_object_errors_subclass_their_builtin_and_pickle(
    error: type[hc.StorageError], builtin: type[Exception]
) -> None:
    raised = error("what failed; how to fix it", prefix="p", uuid="u")
    assert isinstance(raised, hc.StorageError) and isinstance(raised, builtin)
    again = pickle.loads(pickle.dumps(raised))
    assert type(again) is error and str(again) == "what failed; how to fix it"
    assert (again.prefix, again.uuid) == ("p", "u")
