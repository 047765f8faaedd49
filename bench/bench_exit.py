"""The training process's exit: seconds from the job's end to the process's end, with and without the freeze.

``train`` ends through :func:`maskrcnn.cli.exit_process`, which freezes the garbage collector's objects
before the interpreter's shutdown; without it the shutdown collects torch's and torchvision's hundreds of
thousands of objects several times over. That time lies outside ``max_runtime``'s clock (a stopped
attempt's exit is unseen by its restart's budget) and every test that starts ``train`` waits for it.

Each run starts a process that imports what ``train`` imports, says so, and exits, as ``train`` would
(``exit_process``) or with a plain ``sys.exit``; the two alternate, and the medians and their ratio are printed.

    .venv/bin/python bench/bench_exit.py [--runs 6]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostinfo  # bench/hostinfo.py (benchmarks run as scripts: bench/ is on sys.path)

IMPORTS = "import sys, torch, torchvision; from maskrcnn.cli import exit_process; from maskrcnn.train import job"
EXITS = {"sys.exit": "sys.exit(0)", "exit_process": "exit_process(0)"}


def exit_seconds(how: str) -> float:
    """Seconds from the process's last line to its end."""
    code = f"{IMPORTS}\nprint('ready', flush=True)\n{EXITS[how]}"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {how} process did not start")
    ready = time.perf_counter()
    process.wait()
    return time.perf_counter() - ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    print(hostinfo.describe())
    times: dict[str, list[float]] = {how: [] for how in EXITS}
    for _ in range(args.runs):
        for how in EXITS:
            times[how].append(exit_seconds(how))
    for how, seconds in times.items():
        print(f"{how:>12}: median {statistics.median(seconds):.2f} s  ({', '.join(f'{s:.2f}' for s in seconds)})")
    ratio = statistics.median(times["exit_process"]) / statistics.median(times["sys.exit"])
    print(f"exit_process / sys.exit: {ratio:.2f}x")


if __name__ == "__main__":
    main()
