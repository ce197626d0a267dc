"""Every hotcopy benchmark in one go, each against its baseline measured in the same run.

Runs scripts/bench_storage.py, bench_leases.py, bench_copy.py and bench_backup.py (each in
its own process), prints one table of ratios next to the targets of DESIGN.md, writes all the
figures as JSON, and with --plot draws writer commit latency over time with the copy marked
plus a bar chart of the ratios (needs matplotlib: pip install '.[plot]').

    python scripts/bench.py --quick [--json results.json] [--plot bench.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run(script: str, args: list[str], json_to_stdout: bool = False) -> dict[str, Any]:
    """Run one benchmark script; its JSON results (or an error entry)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, str(HERE / script), *args]
        command += ["--json"] if json_to_stdout else ["--json", out.name]
        began = time.monotonic()
        proc = subprocess.run(command, capture_output=True, text=True)
        seconds = time.monotonic() - began
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
        text = proc.stdout if json_to_stdout else Path(out.name).read_text()
        result: dict[str, Any] = json.loads(text)
        result["_seconds"] = round(seconds, 1)
        return result


def table(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows of (figure, measured, baseline in the same run, target)."""
    rows: list[tuple[str, str, str, str]] = []
    storage = results.get("storage", {})
    if "commits" in storage:
        c = storage["commits"]
        rows.append(
            (
                "commit rate, small commits",
                f"{c['ratio_fdatasync']:.2f}x",
                "raw write+fdatasync",
                ">= 0.8x",
            )
        )
        rows.append(
            (
                "commit rate, small commits",
                f"{c['ratio_prealloc']:.2f}x",
                "raw fdatasync into preallocated space",
                "(stricter baseline)",
            )
        )
    leases = results.get("leases", {})
    if "latency" in leases:
        for key, value in leases["latency"]["ratios"].items():
            target = "<= 0.35x" if "filelock" in key else "<= 1.2x"
            rows.append((f"lease acquire+release ({key})", f"{value}x", key, target))
        best = max(row["ops_per_s"] for row in leases["throughput"])
        rows.append(("lease throughput, 8 processes", f"{best:,.0f}/s", "-", ">= 20,000/s"))
        kill = leases["kill_to_grant"]
        rows.append(("holder SIGKILL -> waiter grant", f"{kill['median_ms']} ms", "-", "< 1 s"))
    copy = results.get("copy", {})
    if "copy" in copy:
        rows.append(
            (
                f"copy_prefix of {copy['size_mib']} MiB incl. fsync",
                f"{copy['copy']['ratio']:.2f}x",
                "cp + sync",
                ">= 1.0x",
            )
        )
        rows.append(
            (
                "restore_prefix of that copy",
                f"{copy['restore']['ratio']:.2f}x",
                "cp + sync of the copy",
                ">= 0.9x",
            )
        )
        if "small_records" in copy:
            small = copy["small_records"]
            rows.append(
                (
                    f"copy_prefix of {small['bytes'] / (1 << 20):.0f} MiB of small records",
                    f"{small['ratio']:.2f}x",
                    "cp + sync",
                    "-",
                )
            )
        w = copy["writer"]
        rows.append(
            ("writer commit p99 during the copy", f"{w['p99_ratio']:.2f}x", "no copy", "<= 2x")
        )
        during = w["during_copy"]
        rows.append(
            (
                "writer's longest stall during the copy",
                f"{during['max_ms']:.0f} ms",
                f"lease wait {during['max_lease_wait_ms']:.0f} + commit "
                f"{during['max_commit_ms']:.0f} ms; {w['during_cp_sync']['max_ms']:.0f} ms "
                "during cp+sync",
                "one checkpoint",
            )
        )
        rows.append(
            (
                "writer's longest wait for the write lease",
                f"{during['longest_lease_wait_ms']:.0f} ms",
                f"the copy's cut {during['cut_ms']:.0f} ms",
                "one checkpoint",
            )
        )
    backup = results.get("backup", {})
    if "bulk" in backup:
        b = backup["bulk"]
        for key in sorted(k for k in b if k.startswith("jobs_") and k.endswith("_ratio")):
            jobs = key.split("_")[1]
            rows.append(
                (
                    f"bulk backup {b['prefixes']} x 1 MiB, --jobs {jobs}",
                    f"{b[key]:.2f}x",
                    "cp -r + sync",
                    ">= 1.0x (jobs 2)",
                )
            )
        for key in sorted(k for k in b if k.startswith("restore_jobs_") and k.endswith("_ratio")):
            jobs = key.split("_")[2]
            rows.append(
                (f"restore, --jobs {jobs}", f"{b[key]:.2f}x", "cp -r + sync", ">= 0.9x")
            )
        i = backup["incremental"]
        rows.append(
            (
                f"incremental after 1% of {i['mib']} MiB",
                f"time {i['time_ratio']:.3f}x, bytes {i['bytes_ratio']:.4f}x",
                "full backup",
                "<= 0.05x",
            )
        )
        one = backup["big_restore"]
        rows.append(
            (
                f"restore of one {one['mib']} MiB prefix",
                f"{one['ratio']:.2f}x",
                "cp -r + sync of its backup",
                ">= 0.9x",
            )
        )
    return rows


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8))
    trace = results.get("copy", {}).get("latency_trace")
    if trace:
        t0 = trace["samples"][0][0]
        top.plot(
            [at - t0 for at, _ in trace["samples"]],
            [1000 * lat for _, lat in trace["samples"]],
            ".",
            markersize=2,
        )
        if trace["window"]:
            start, end = trace["window"]
            top.axvspan(start - t0, end - t0, alpha=0.2, color="orange", label="copy_prefix")
        top.set_yscale("log")
        top.set_xlabel("seconds")
        top.set_ylabel("commit latency (ms)")
        top.set_title("writer commit latency while a copy of the prefix runs")
        top.legend()
    ratios = []
    for figure_name, measured, _, _ in table(results):
        if measured.endswith("x") and measured[:-1].replace(".", "").isdigit():
            ratios.append((figure_name, float(measured[:-1])))
    bottom.barh([name for name, _ in ratios], [value for _, value in ratios])
    bottom.axvline(1.0, color="grey", linewidth=0.8)
    bottom.set_xlabel("ratio against the baseline in the same run")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: about two minutes")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--plot", type=Path, help="write latency and ratio charts (PNG)")
    parser.add_argument("--only", choices=("storage", "leases", "copy", "backup"), nargs="*")
    args = parser.parse_args(argv)
    quick = ["--quick"] if args.quick else []
    plan = {
        "storage": ("bench_storage.py", quick, False),
        "leases": (
            "bench_leases.py",
            ["--iterations", "3000", "--rounds", "5", "--seconds", "1.5", "--kill-trials", "3"]
            if args.quick
            else [],
            True,
        ),
        "copy": ("bench_copy.py", quick, False),
        "backup": (
            "bench_backup.py",
            ["--prefixes", "100", "--big-mib", "64"] if args.quick else [],
            False,
        ),
    }
    results: dict[str, Any] = {
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for name, (script, extra, to_stdout) in plan.items():
        if args.only and name not in args.only:
            continue
        print(f"running {script} ...", file=sys.stderr, flush=True)
        results[name] = run(script, extra, to_stdout)
    rows = table(results)
    width = max([len(row[0]) for row in rows] + [6])
    print(f"{'figure':<{width}}  {'measured':<26} {'baseline (same run)':<32} target")
    for figure_name, measured, baseline, target in rows:
        print(f"{figure_name:<{width}}  {measured:<26} {baseline:<32} {target}")
    for name in plan:
        if "error" in results.get(name, {}):
            print(f"{name}: FAILED {results[name]['error']}")
    if args.json:
        args.json.write_text(json.dumps(results))
    if args.plot:
        plot(results, args.plot)
        print(f"plot written to {args.plot}")
    return 1 if any("error" in results.get(name, {}) for name in plan) else 0


if __name__ == "__main__":
    sys.exit(main())
