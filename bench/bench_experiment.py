"""Experiment-path throughput benchmark; last line is `ratio=<ours/plain generate at the default batch size>`.

Usage: .venv/bin/python bench/bench_experiment.py [--dtype bfloat16] [--batch-sizes 8,48,96] [--repeats 2]
(same as `esr-lab bench experiment`).
"""

import sys

from esr_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "experiment", *sys.argv[1:]]))
