"""hotcopy workers: copy-worker pools, bulk and scheduled backups, replication, restore, and the
CLI."""

from ._backup import BackupResult, RestoreResult, backup, restore
from ._catalog import Catalog, list_backups
from ._cli import main
from ._errors import BackupError, BackupNotFound, CatalogError, WorkerDied
from ._logical import apply_delta
from ._manager import BackupManager
from ._pool import CopyWorkerPool
from ._replicate import Replicator
from ._retention import PruneReport, prune

__all__ = [
    "BackupError",
    "BackupManager",
    "BackupNotFound",
    "BackupResult",
    "Catalog",
    "CatalogError",
    "CopyWorkerPool",
    "PruneReport",
    "Replicator",
    "RestoreResult",
    "WorkerDied",
    "apply_delta",
    "backup",
    "list_backups",
    "main",
    "prune",
    "restore",
]
