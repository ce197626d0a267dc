"""Every example of the seed "Understanding Prefixes & Scoped types" (dbzero), run as written.

Adapted only in the import line (``import hotcopy.storage as db0``) and in defining the small
classes the seed assumes (``SomeUserClass``, ``User``, ``Document``). Printed output is checked
line by line against the output the seed states.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hotcopy.storage as db0
import pytest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[db0.Repository]:
    repository = db0.init(tmp_path / "repo")
    try:
        yield repository
    finally:
        db0.close()


def _record_key(obj: Any) -> str:
    """The key of ``obj``'s record on its prefix (the uuid names the prefix, the key does not)."""
    return "obj/" + db0.uuid(obj).rpartition(":")[2]


def _lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_scoped_classes(repo: db0.Repository, capsys: pytest.CaptureFixture[str]) -> None:
    # All instances of this class will be stored on the "settings-prefix"
    @db0.memo(prefix="settings-prefix")
    class AppSettings:
        def __init__(self, theme: str, language: str):
            self.theme = theme
            self.language = language

    # This class is not scoped; its instances go to the current prefix
    @db0.memo(prefix=None)
    class UserNote:
        def __init__(self, content: str):
            self.content = content

    # Let's create some objects
    db0.open("user-data", "rw")  # Set the current prefix to "user-data"

    # This object is created on "settings-prefix" despite the current prefix
    settings = AppSettings(theme="dark", language="en")

    # This object is created on the current prefix, "user-data"
    note = UserNote(content="Remember to buy milk.")

    # Let's verify
    print(db0.get_prefix_of(settings).name)  # Outputs: "settings-prefix"
    print(db0.get_prefix_of(note).name)  # Outputs: "user-data"
    print(db0.get_current_prefix().name)  # Outputs: "user-data"

    assert _lines(capsys) == ["settings-prefix", "user-data", "user-data"]
    # Stored where they claim to be, and durable after one commit.
    db0.commit()
    assert db0.fetch(AppSettings, db0.uuid(settings)).theme == "dark"
    assert _record_key(settings) in db0.get_prefix_of(AppSettings)
    assert _record_key(settings) not in db0.get_current_prefix()


def test_scoped_enums(repo: db0.Repository, capsys: pytest.CaptureFixture[str]) -> None:
    db0.open("user-data", "rw")  # where the seed's SomeUserClass objects go

    @db0.memo
    class SomeUserClass:
        pass

    @db0.enum(values=["ADMIN", "USER", "GUEST"], prefix="user-roles")
    class Role:
        pass

    # The Role enum and its values (Role.ADMIN, etc.) belong to the "user-roles" prefix
    print(db0.get_prefix_of(Role).name)  # Outputs: "user-roles"
    print(db0.get_prefix_of(Role.ADMIN).name)  # Outputs: "user-roles"

    # Now you can tag objects with these scoped enum values
    user_object = SomeUserClass()
    db0.tags(user_object).add(Role.ADMIN)

    assert _lines(capsys) == ["user-roles", "user-roles"]
    assert db0.find(SomeUserClass, Role.ADMIN) == [user_object]
    assert db0.find(SomeUserClass, Role.USER) == []


def test_dynamic_scoping(repo: db0.Repository, capsys: pytest.CaptureFixture[str]) -> None:
    @db0.memo
    class Project:
        def __init__(self, name: str, client_id: str):
            # The set_prefix call must be the first operation in __init__.
            # The prefix is determined dynamically, e.g., from a constructor argument.
            db0.set_prefix(self, f"client_{client_id}_projects")

            # Now you can initialize other attributes
            self.name = name

    # Create an instance for client "acme".
    # This will create and/or open the "client_acme_projects" prefix
    # and store the object there.
    project_acme = Project(name="Website Redesign", client_id="acme")

    print(db0.get_prefix_of(project_acme).name)  # Outputs: "client_acme_projects"

    assert _lines(capsys) == ["client_acme_projects"]
    # No current prefix was needed, nor set: the object went where set_prefix said.
    assert "client_acme_projects" in repo.prefixes()
    with pytest.raises(RuntimeError):
        db0.get_current_prefix()
    db0.get_prefix_of(project_acme).commit()
    assert db0.fetch(Project, db0.uuid(project_acme), prefix="client_acme_projects").name == (
        "Website Redesign"
    )


def test_automatic_reference_hardening(
    repo: db0.Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    @db0.memo(prefix="document-archive")
    class ArchivedDocument:
        def __init__(self, title):
            self.title = title
            # This index starts on the "document-archive" prefix, so the reference to is is
            # already "hard".
            self.revisions = db0.index()

    # Set current prefix to a different workspace
    db0.open("default-workspace", "rw")

    # 1. Create an index on the current prefix ("default-workspace").
    #    This is a "weak" reference relative to the ArchivedDocument.
    temp_index = db0.index()
    print(f"Prefix of temp_index before: {db0.get_prefix_of(temp_index).name}")

    # 2. Create the scoped object.
    doc = ArchivedDocument("Q3 Report")

    # 3. Assign the weak reference. Auto-hardening occurs here.
    doc.revisions = temp_index

    # 4. The index has been moved to the object's prefix, becoming a "hard" reference.
    print(f"Prefix of doc: {db0.get_prefix_of(doc).name}")
    print(f"Prefix of doc.revisions after: {db0.get_prefix_of(doc.revisions).name}")

    assert _lines(capsys) == [
        "Prefix of temp_index before: default-workspace",
        "Prefix of doc: document-archive",
        "Prefix of doc.revisions after: document-archive",
    ]
    assert doc.revisions is temp_index  # the same object, moved (same uuid)
    assert db0.getrefcount(temp_index) == 1
    db0.commit()
    assert _record_key(temp_index) not in db0.get_current_prefix()


def test_an_index_made_in_a_scoped_init_starts_on_that_prefix(repo: db0.Repository) -> None:
    # The seed's comment: "This index starts on the "document-archive" prefix, so the reference
    # to it is already "hard"" -- so no current prefix is needed, and none is touched.
    @db0.memo(prefix="document-archive")
    class ArchivedDocument:
        def __init__(self, title):
            self.title = title
            self.revisions = db0.index()

    doc = ArchivedDocument("Q3 Report")
    assert db0.get_prefix_of(doc.revisions).name == "document-archive"
    assert repo.prefixes() == ["document-archive"]
    doc.revisions.add(1, "draft")
    db0.get_prefix_of(doc).commit()
    assert db0.fetch(ArchivedDocument, db0.uuid(doc)).revisions.range() == ["draft"]


def test_hardening_never_moves_a_container_that_holds_data(repo: db0.Repository) -> None:
    # "Hardening only applies to empty, unreferenced dbzero containers ... containers that
    # already hold data will not be moved."
    @db0.memo(prefix="document-archive")
    class ArchivedDocument:
        def __init__(self, title):
            self.title = title

    db0.open("default-workspace", "rw")
    full = db0.index()
    full.add(1, "draft")
    doc = ArchivedDocument("Q3 Report")
    with pytest.raises(db0.CrossPrefixReference, match="default-workspace"):
        doc.revisions = full
    assert db0.get_prefix_of(full).name == "default-workspace"


def test_linking_objects_across_prefixes(
    repo: db0.Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    user, doc = _user_and_document()

    # This would FAIL:
    with pytest.raises(db0.StorageError):
        doc.author = user  # Raises an exception!

    # This is the correct way:
    doc.author = db0.weak_proxy(user)

    # The proxy is transparent; you can access attributes through it
    print(doc.author.name)  # Outputs: "John Doe"

    # The reference count of the user object is not affected
    before = db0.getrefcount(user)
    print(db0.getrefcount(user))  # Stays the same

    assert _lines(capsys) == ["John Doe", str(before)]
    assert before == 0


def test_expired_references(repo: db0.Repository, capsys: pytest.CaptureFixture[str]) -> None:
    db0.open("workspace", "rw")  # db0.commit() commits the current prefix and every other one
    user, doc = _user_and_document()
    user_uuid = db0.uuid(user)

    doc.author = db0.weak_proxy(user)

    # Now, let's delete the user
    del user
    db0.commit()

    # Check the status of the proxy
    print(db0.expired(doc.author))  # Outputs: True

    # This would now raise an error:
    with pytest.raises(db0.ReferenceError):
        print(doc.author.name)  # db0.ReferenceError

    # You can still retrieve the UUID of the object the proxy once pointed to
    uuid_of_deleted_user = db0.uuid(doc.author)

    assert _lines(capsys) == ["True"]
    assert uuid_of_deleted_user == user_uuid


def _user_and_document() -> tuple[Any, Any]:
    """The seed's setup: "Assume user is on "users-prefix" and document is on "docs-prefix"."""

    @db0.memo
    class User:
        def __init__(self, name: str, prefix: str):
            db0.set_prefix(self, prefix)
            self.name = name

    @db0.memo
    class Document:
        def __init__(self, title: str, prefix: str):
            db0.set_prefix(self, prefix)
            self.title = title

    user = User(name="John Doe", prefix="users-prefix")
    doc = Document(title="Contract", prefix="docs-prefix")
    return user, doc
