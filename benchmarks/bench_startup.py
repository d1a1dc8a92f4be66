"""Start-up time of the ``ttt-mixer`` command (issue 27: under 1.5 s for its help, every
subcommand's help and ``tasks-path``), against ``import ttt_mixer`` (the library's import, which
imports fla, torch and transformers) for scale. Each is run ``--repeats`` times in a fresh process;
prints the median and the slowest, in seconds, and exits 1 if a command's median is over ``--bound``.

    python benchmarks/bench_startup.py                  # 5 repeats, bound 1.5 s
    python benchmarks/bench_startup.py --repeats 3 --bound 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

SUBCOMMANDS = ("demo", "convert", "eval", "plot", "recall-gap", "swap", "distill")
COMMANDS = [["--help"], ["tasks-path"], *([name, "--help"] for name in SUBCOMMANDS)]


def seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default: %(default)s)")
    parser.add_argument(
        "--bound", type=float, default=1.5, help="seconds a median may take (default: %(default)s)"
    )
    args = parser.parse_args()
    executable = shutil.which("ttt-mixer") or sys.exit("ttt-mixer is not installed (bash scripts/setup.sh)")
    over = []
    for command in COMMANDS:
        times = [seconds([executable, *command]) for _ in range(args.repeats)]
        median = statistics.median(times)
        print(f"ttt-mixer {' '.join(command):<22} median {median:5.2f} s, slowest {max(times):5.2f} s")
        if median > args.bound:
            over.append(" ".join(command))
    library = seconds([sys.executable, "-c", "import ttt_mixer"])
    print(f"{'import ttt_mixer (the library)':<32} once   {library:5.2f} s")
    if over:
        sys.exit(f"over {args.bound} s: {', '.join(over)}")


if __name__ == "__main__":
    main()
