"""Make a repository of an older format (tests/data/formatN-repo.tar.gz): run with a release of
that format on the path (format 2: 9dff840; format 3: cde0128), then tar the directory without
.hotcopy/. It holds
prefix "legacy": 300 keys over several checkpoints, deletes, the last commits only in the WAL;
prefix "empty": created, never committed."""

import sys
from pathlib import Path

from hotcopy.storage import FileLeases, Repository

root = Path(sys.argv[1])
Repository.init(root).close()
with Repository(root, leases=FileLeases(root / ".hotcopy"), checkpoint_bytes=4096) as repo:
    p = repo.open_prefix("legacy", "rw")
    for i in range(300):
        p[f"key{i:04d}"] = {"n": i, "text": "é" * (i % 7)}
        if i % 10 == 9:
            p.commit()
    for i in range(0, 300, 7):
        del p[f"key{i:04d}"]
    p.commit()
    p.checkpoint()
    p["late"] = [1, 2, 3]
    del p["key0001"]
    p.commit()
    repo.open_prefix("empty", "rw").close()
