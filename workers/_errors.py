"""Backup errors: the ``BackupError`` sub-root of hotcopy's exception tree."""

from __future__ import annotations

from hotcopy.coordinator._errors import HotcopyError


class BackupError(HotcopyError):
    """A backup, restore or prune could not do what was asked."""


class BackupInterrupted(KeyboardInterrupt):
    """A backup run was interrupted (Ctrl-C); ``recorded``: whether what it had copied was
    recorded as a partial backup (an interrupt while publishing it records nothing)."""

    def __init__(self, recorded: bool) -> None:
        super().__init__()
        self.recorded = recorded


class WorkerDied(BackupError):
    """A copy-worker process died while running a job (the job may be retried)."""


class CatalogError(BackupError):
    """A backup directory is missing, damaged, or belongs to another repository."""


class BackupNotFound(CatalogError, LookupError):
    """No complete backup matches the request."""


class BackupUnreadable(CatalogError):
    """This user may not read what a backup holds (another user's, in a shared catalog): it
    is neither used nor removed, and nothing it may link to is removed."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as its ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text
