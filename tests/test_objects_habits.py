"""What a dbzero user does out of habit, run against hotcopy as they would write it.

Each test is one habit (issue 16): the module API exactly as the seed documents use it
(``hc.init``, ``hc.open``, ``@hc.memo``, ``hc.commit()``, ``hc.close()``), checked through
what the user can see: values read back, ``get_prefix_of``, ``fetch``, a reopen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hotcopy.storage as hc
import pytest

pytestmark = pytest.mark.timeout(60)


@hc.memo(type_id="habits.Note")
class Note:
    def __init__(self, text: str, **attrs: Any) -> None:
        self.text = text
        for key, value in attrs.items():
            setattr(self, key, value)


@hc.memo(prefix="settings", type_id="habits.Settings")
class Settings:
    def __init__(self, theme: str) -> None:
        self.theme = theme


@hc.memo(type_id="habits.Cache")
class Cache:
    def __init__(self, prefix: str | None = None) -> None:
        hc.set_prefix(self, prefix)  # dbzero's reusable scoped class: None means "no scope"
        self.hits = 0


@hc.memo(prefix="settings", type_id="habits.ScopedCache")
class ScopedCache:
    def __init__(self) -> None:
        hc.set_prefix(self, None)
        self.hits = 0


@hc.enum(values=["RED", "GREEN", "BLUE"], type_id="habits.Color")
class Color:
    pass


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "repo"
    hc.init(path)
    try:
        yield path
    finally:
        hc.close()


# -- prefixes ------------------------------------------------------------------------------------


def test_prefixes_are_equal_only_to_themselves_whatever_they_hold(root: Path) -> None:
    a = hc.open("a", "rw")
    b = hc.open("b", "rw")  # both empty: equal contents
    assert a != b and (a == b) is False
    assert len({a, b}) == 2 and {a: "a", b: "b"}[b] == "b"
    hc.open("a", "rw")
    on_a = Note("on a")
    assert hc.get_prefix_of(on_a) == a and hc.get_prefix_of(on_a) != b
    with hc.Repository(root) as again:  # the same prefix through another repository object
        same = again.open_prefix("a", "r")
        assert same == a and hash(same) == hash(a)
        assert same != again.open_prefix("b", "r")
    hc.commit()


# -- lifetime ------------------------------------------------------------------------------------


def test_removing_the_last_tag_through_a_temporary_deletes_the_object(root: Path) -> None:
    hc.open("notes", "rw")
    hc.tags(Note("scratch")).add("todo")
    hc.commit()
    uid = hc.uuid(hc.find(Note, "todo")[0])
    hc.tags(hc.find(Note, "todo")[0]).remove("todo")  # nothing else holds the object
    hc.commit()
    with pytest.raises(hc.ObjectNotFound):
        hc.fetch(Note, uid)
    hc.close()
    hc.init(root)
    hc.open("notes", "r")
    with pytest.raises(hc.ObjectNotFound):
        hc.fetch(Note, uid)
    assert [key for key in hc.get_current_prefix() if key.startswith("obj/")] == []


def test_removing_the_last_tag_through_a_variable_deletes_the_object(root: Path) -> None:
    hc.open("notes", "rw")
    hc.tags(Note("scratch")).add("todo")
    hc.commit()
    note = hc.find(Note, "todo")[0]
    uid = hc.uuid(note)
    hc.tags(note).remove("todo")
    del note
    hc.commit()
    with pytest.raises(hc.ObjectNotFound):
        hc.fetch(Note, uid)


# -- scoping -------------------------------------------------------------------------------------


def test_set_prefix_none_means_no_dynamic_scope(root: Path) -> None:
    hc.open("work", "rw")
    assert hc.get_prefix_of(Cache()).name == "work"  # the current prefix
    assert hc.get_prefix_of(Cache("client_a")).name == "client_a"
    assert hc.get_prefix_of(ScopedCache()).name == "settings"  # the class's static scope
    hc.commit()


# -- close ---------------------------------------------------------------------------------------


def test_close_commits_what_is_pending_like_dbzero(root: Path) -> None:
    hc.open("notes", "rw")
    kept = Note("kept")
    hc.tags(kept).add("mine")
    dropped = Note("dropped")  # unreferenced: deleted at close, before its commit
    settings = Settings("dark")  # pending on another prefix, opened on demand
    ids = hc.uuid(kept), hc.uuid(dropped), hc.uuid(settings)
    del dropped
    hc.close()  # no commit() first: dbzero's close commits read-write prefixes

    hc.init(root)
    hc.open("notes", "r")
    assert [note.text for note in hc.find(Note, "mine")] == ["kept"]
    assert hc.fetch(Settings, ids[2]).theme == "dark"
    with pytest.raises(hc.ObjectNotFound):
        hc.fetch(Note, ids[1])


def test_close_of_one_prefix_commits_it_and_leaves_the_others_open(root: Path) -> None:
    repo = hc.init(root)
    hc.open("a", "rw")
    on_a = Note("on a")
    hc.open("b", "rw")
    on_b = Note("on b")
    hc.tags(on_b).add("b")
    ids = hc.uuid(on_a), hc.uuid(on_b)
    hc.close("b")
    assert hc.get_current_prefix().name == "a" and "b" not in repo.open_prefixes()
    with hc.Repository(root) as other:  # what is committed now, as another reader sees it
        committed = list(other.open_prefix("b", "r"))
        assert [key for key in committed if key.startswith("obj/")] == [
            "obj/" + ids[1].rpartition(":")[2]
        ]
        assert "tag/s:b" in committed  # the note and its tag
        assert len(other.open_prefix("a", "r")) == 0  # "a" is still open, its change pending
    hc.close()
    hc.init(root)
    hc.open("b", "r")
    assert [note.text for note in hc.find(Note, "b")] == ["on b"]
    assert hc.fetch(Note, ids[0], prefix="a").text == "on a"  # committed by close()
    assert hc.fetch(Note, ids[1]).text == "on b"


def test_prefix_close_of_the_object_api_rolls_back(root: Path) -> None:
    repo = hc.init(root)
    prefix = repo.open_prefix("plain", "rw")
    prefix["committed"] = 1
    prefix.commit()
    prefix["pending"] = 2
    prefix.close()  # the object API: explicit commits only
    with repo.open_prefix("plain", "r") as again:
        assert dict(again) == {"committed": 1}


# -- the current prefix ----------------------------------------------------------------------------


def test_closing_the_current_prefix_makes_the_previous_one_current(root: Path) -> None:
    repo = hc.init(root)
    hc.open("a", "rw")
    hc.open("b", "rw")
    on_b = Note("on b")
    hc.open("c", "rw")
    hc.commit()
    hc.close("b")  # not the current one: "c" stays current
    assert hc.get_current_prefix().name == "c"
    hc.close("c")
    assert hc.get_current_prefix().name == "a"  # "b" was closed too: back to "a"
    assert on_b.text == "on b"  # its prefix is opened again, to read it ...
    assert repo.open_prefixes()["b"].mode == "r"  # ... read-only
    assert hc.get_current_prefix().name == "a"
    on_b.text = "changed"  # a change reopens it for writing
    assert repo.open_prefixes()["b"].mode == "rw"
    hc.commit()
    hc.close("a")
    with pytest.raises(RuntimeError, match="no prefix is open"):
        hc.get_current_prefix()
    hc.close()
    hc.init(root)
    assert hc.fetch(Note, hc.uuid(on_b), prefix="b").text == "changed"


# -- uuids ---------------------------------------------------------------------------------------


def test_a_uuid_names_its_prefix(root: Path) -> None:
    hc.open("a", "rw")
    hc.open("b", "rw")
    note = Note("on b")
    uid = hc.uuid(note)
    assert uid.startswith("b:") and len(uid.split(":")[1]) == 32
    hc.commit()
    hc.open("a", "rw")
    assert hc.get_prefix_of(uid).name == "b"
    assert hc.fetch(uid) is note
    assert hc.fetch(Note, uid) is note
    with pytest.raises(TypeError, match="not a Settings"):
        hc.fetch(Settings, uid)
    assert hc.uuid(hc.weak_proxy(note)) == uid
    bare = uid.split(":")[1]  # an old uuid: still found where its prefix is known
    assert hc.fetch(Note, bare, prefix="b") is note and hc.fetch(bare, prefix="b") is note
    with pytest.raises(ValueError, match="prefix"):
        hc.get_prefix_of(bare)
    with pytest.raises(hc.ObjectNotFound, match="'b'"):
        hc.fetch(Note, uid, prefix="a")
    hc.close()
    hc.init(root)
    hc.open("a", "rw")  # "b" is not open: the uuid says where to look
    assert hc.fetch(uid).text == "on b" and hc.fetch(Note, uid).text == "on b"


# -- values --------------------------------------------------------------------------------------


def test_tuples_and_sets_round_trip_with_their_type(root: Path) -> None:
    hc.open("values", "rw")
    values: dict[str, Any] = {
        "pair": (1, "two"),
        "empty": (),
        "tags": {"a", "b"},
        "frozen": frozenset({1, (2, 3)}),
        "nested": [(1, (2, [3, {4}])), {"key": (frozenset({"x"}),)}],
        "empty_set": set(),
    }
    note = Note("values", **values)
    listed = hc.list([(1, 2), {3}])
    note.listed = listed
    uid = hc.uuid(note)
    hc.close()
    hc.init(root)
    hc.open("values", "r")
    loaded = hc.fetch(Note, uid)
    for key, value in values.items():
        assert getattr(loaded, key) == value
        assert type(getattr(loaded, key)) is type(value)
    nested = loaded.nested
    assert type(nested[0][1]) is tuple and type(nested[0][1][1][1]) is set
    assert type(nested[1]["key"][0]) is frozenset
    assert list(loaded.listed) == [(1, 2), {3}]


def test_a_memo_class_is_a_member_value(root: Path) -> None:
    hc.open("types", "rw")
    note = Note("factory", kind=Note)
    settings = Settings("dark")
    settings.kind = Settings  # on the class's own prefix
    ids = hc.uuid(note), hc.uuid(settings)
    hc.close()
    hc.init(root)
    hc.open("types", "rw")
    assert hc.fetch(Note, ids[0]).kind is Note
    assert hc.fetch(Settings, ids[1]).kind is Settings
    made = hc.fetch(Note, ids[0]).kind("made from the stored class")
    assert type(made) is Note


# -- enums ---------------------------------------------------------------------------------------


def test_unscoped_enum_values_belong_to_the_prefix_they_were_taken_on(root: Path) -> None:
    hc.open("a", "rw")
    on_a = Color.RED
    hc.open("b", "rw")
    on_b = Color.RED
    assert hc.get_prefix_of(on_a).name == "a" and hc.get_prefix_of(on_b).name == "b"
    assert on_a == on_b and (on_a != on_b) is False and hash(on_a) == hash(on_b)
    assert on_a != Color.GREEN and Color.RED is on_b  # taken again on "b": the same value
    assert on_b in {on_a} and {on_a: "red"}[on_b] == "red" and [on_a].index(on_b) == 0
    settings = Settings("dark")
    settings.color = on_b  # stored into an object: it becomes a value of the object's prefix
    assert hc.get_prefix_of(settings.color).name == "settings"
    assert settings.color == on_a
    note = Note("tagged")
    hc.tags(note).add(on_a)
    assert hc.find(Note, on_b) == [note]  # a value of another prefix finds it
    (tag,) = hc.tags(note)
    assert tag == on_a and hc.get_prefix_of(tag).name == "b"  # the note's prefix
    hc.commit()


# -- weak proxies --------------------------------------------------------------------------------


def test_a_weak_proxy_equals_its_target(root: Path) -> None:
    hc.open("main", "rw")
    target, other = Settings("dark"), Settings("light")
    holder = Note("holder", link=hc.weak_proxy(target))
    proxy = holder.link
    assert proxy == target and target == proxy and (proxy != target) is False
    assert hash(proxy) == hash(target)
    assert proxy in {target} and target in {proxy} and {target: 1}[proxy] == 1
    assert proxy != other and other != proxy
    index = hc.index()  # a container too
    assert hc.weak_proxy(index) == index and hash(hc.weak_proxy(index)) == hash(index)
    hc.commit()


# -- enum definitions ----------------------------------------------------------------------------


def _define_palette(values: list[str]) -> hc.EnumType:
    @hc.enum(values=values, prefix="palettes")
    class Palette:
        pass

    return Palette


def test_redefining_a_scoped_enum_with_other_values_is_refused(root: Path) -> None:
    first = _define_palette(["WARM", "COLD"])
    again = _define_palette(["WARM", "COLD"])  # the same definition again: fine
    assert again.WARM == first.WARM
    with pytest.raises(hc.EnumRedefined, match="WARM") as caught:
        _define_palette(["WARM", "NEON"])
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, hc.StorageError)
    hc.open("main", "rw")
    note = Note("painted", palette=first.COLD)
    assert note.palette == first.COLD  # the first definition is still the one in use
