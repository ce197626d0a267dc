"""``python -m hotcopy.coordinator ROOT``: run the coordinator of ROOT."""

from __future__ import annotations

from ._main import main

if __name__ == "__main__":
    raise SystemExit(main())
