"""hotcopy workers: copy-worker pools, bulk and scheduled backups, restore, and the CLI."""

from ._backup import BackupResult, RestoreResult, backup, prune, restore
from ._catalog import Catalog
from ._cli import main
from ._errors import BackupError, BackupNotFound, CatalogError, WorkerDied
from ._logical import apply_delta
from ._manager import BackupManager
from ._pool import CopyWorkerPool

__all__ = [
    "BackupError",
    "BackupManager",
    "BackupNotFound",
    "BackupResult",
    "Catalog",
    "CatalogError",
    "CopyWorkerPool",
    "RestoreResult",
    "WorkerDied",
    "apply_delta",
    "backup",
    "main",
    "prune",
    "restore",
]
