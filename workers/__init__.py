"""hotcopy workers: the command line (and, later, copy workers, pools and BackupManager)."""

from ._cli import main

__all__ = ["main"]
