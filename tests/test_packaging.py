"""Packaging: only ``hotcopy.*`` is importable, the storage surface is pinned, and every
subpackage ships ``py.typed``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import hotcopy.storage
import pytest

pytestmark = pytest.mark.timeout(60)

STORAGE_ALL = [
    "ClosedError",
    "CopyResult",
    "CorruptFileError",
    "CrossPrefixReference",
    "Cut",
    "DestinationExists",
    "EnumRedefined",
    "EnumType",
    "EnumValue",
    "FileLeases",
    "HeldLease",
    "InvalidPrefixName",
    "LeaseProvider",
    "MemoIndex",
    "MemoList",
    "NeedsMigration",
    "NotEnoughSpace",
    "NotRegularFile",
    "ObjectNotFound",
    "Prefix",
    "PrefixNotFound",
    "ReadOnlyError",
    "ReferenceError",
    "Repository",
    "RepositoryNotFound",
    "SameFileError",
    "ScopeError",
    "SingletonExists",
    "StorageError",
    "Tags",
    "TransactionConflict",
    "VerifyReport",
    "WeakProxy",
    "close",
    "commit",
    "copy_prefix",
    "enum",
    "expired",
    "fetch",
    "find",
    "get_current_prefix",
    "get_prefix_of",
    "getrefcount",
    "index",
    "init",
    "list",
    "memo",
    "open",
    "set_prefix",
    "tags",
    "uuid",
    "validate_prefix_name",
    "verify_file",
    "weak_proxy",
]


def test_no_top_level_storage_coordinator_or_workers_is_importable(tmp_path: Path) -> None:
    code = (
        "import importlib.util, sys; "
        "names = ('storage', 'coordinator', 'workers'); "
        "found = [n for n in names if importlib.util.find_spec(n)]; "
        "print(found); sys.exit(bool(found))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "[]"
    check = subprocess.run(
        [sys.executable, "-c", "import hotcopy.storage, hotcopy.coordinator, hotcopy.workers"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr


def test_storage_all_is_sorted_and_is_exactly_the_public_names() -> None:
    exported = hotcopy.storage.__all__
    assert exported == sorted(exported)
    assert exported == STORAGE_ALL
    public = {
        name
        for name, value in vars(hotcopy.storage).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert public == set(exported)
    for name in exported:
        assert getattr(hotcopy.storage, name) is not None


@pytest.mark.parametrize("package", ["hotcopy.storage", "hotcopy.coordinator", "hotcopy.workers"])
def test_each_subpackage_ships_py_typed(package: str) -> None:
    spec = importlib.util.find_spec(package)  # found without running the package's code
    assert spec is not None and spec.submodule_search_locations
    (location,) = list(spec.submodule_search_locations)
    assert (Path(location) / "py.typed").is_file()
    assert Path(location).name == package.rsplit(".", 1)[1]
