"""hotcopy coordinator: lease broker process and its client.

One coordinator process per repository brokers ``read``/``snapshot``/``write``/
``exclusive`` leases on prefixes with fencing tokens, and publishes its lease table and
per-prefix commit counters in shared memory that any process reads without a round trip.
It is started on demand by :func:`connect` and exits by itself when idle::

    from hotcopy.coordinator import connect
    with connect(root) as client:
        with client.lease("users", "write", timeout=5.0) as lease:
            lease.token

The coordinator's own entry point is ``python -m hotcopy.coordinator`` (``._main``); it is not
imported here, so that a client does not load the server's modules.
"""

from __future__ import annotations

from ._client import Client, ClientStatistics, Lease, connect
from ._errors import (
    ClientClosed,
    CoordinatorUnavailable,
    HotcopyError,
    LeaseError,
    LeaseFenced,
    LeaseTableFull,
    LeaseTimeout,
    UnsafePlace,
    WouldBlock,
)
from ._process import ProcessIdentity, is_alive
from ._protocol import LeaseMode
from ._status import LeaseStatus, Status, format_status, read_status, status_to_json

__all__ = [
    "Client",
    "ClientClosed",
    "ClientStatistics",
    "CoordinatorUnavailable",
    "HotcopyError",
    "Lease",
    "LeaseError",
    "LeaseFenced",
    "LeaseMode",
    "LeaseStatus",
    "LeaseTableFull",
    "LeaseTimeout",
    "ProcessIdentity",
    "Status",
    "UnsafePlace",
    "WouldBlock",
    "connect",
    "format_status",
    "is_alive",
    "read_status",
    "status_to_json",
]
