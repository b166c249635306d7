"""Latency of latent search once the description vectors are loaded: prints ms_per_query=...

Usage: .venv/bin/python bench/bench_search.py [CATALOG_DIR] [N_QUERIES]
(default: the shipped catalog of the default model).
"""

from __future__ import annotations

import sys
import time

from esr_core.latents.catalog.store import SHIPPED_DIR, Catalog
from esr_core.latents.search import search_latents, warm_search
from esr_core.models.registry import DEFAULT_MODEL

QUERIES = ["cooking", "weather and rain", "football", "programming code", "religion", "law and courts",
           "emotions", "numbers", "punctuation", "Shakespeare", "money", "war", "animals", "medicine",
           "music", "politics and elections", "the sea", "love", "chat markup", "newlines"]


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else str(SHIPPED_DIR / DEFAULT_MODEL)
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    t = time.perf_counter()
    cat = Catalog.load(path)
    print(f"catalog_load_ms={1000 * (time.perf_counter() - t):.1f} latents={cat.d_sae}")
    t = time.perf_counter()
    warm_search(cat)
    search_latents(cat, "warm up", top=20)  # loads the embedding model
    print(f"warm_up_ms={1000 * (time.perf_counter() - t):.1f}")
    t, c = time.perf_counter(), time.process_time()
    for k in range(n):  # distinct strings, so the query cache never answers
        search_latents(cat, f"{QUERIES[k % len(QUERIES)]} {k}", top=20)
    ms = 1000 * (time.perf_counter() - t) / n
    cpu = 1000 * (time.process_time() - c) / n
    print(f"cpu_ms_per_query={cpu:.1f}")
    print(f"ms_per_query={ms:.1f}")


if __name__ == "__main__":
    main()
