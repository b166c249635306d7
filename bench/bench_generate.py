"""Generation throughput benchmark; last line is `ratio=<instrumented/plain, batch 1>`.

Usage: .venv/bin/python bench/bench_generate.py [--sae PATH] [--new-tokens 128]
(same as `esr-lab bench generate`).
"""

import sys

from esr_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "generate", *sys.argv[1:]]))
