"""How many rows a generation batch may hold: from the model's KV-cache size and free memory.

The experiment path is fastest with large batches (measured with ``esr-lab bench experiment
--trials 96 --new-tokens 96 --batch-sizes 8,48,96`` on the 2-core CPU: 73, 191 and 242 tokens/s
at 8, 48 and 96 rows, against plain ``generate``'s 73, 165 and 182; 96 is the largest measured,
so larger batches may gain more), but a batch must fit:
each row holds its KV cache for the prompt and every new token, plus a row of logits. The
runner's "auto" batch size is the measured sweet spot, lowered when free memory would not hold
it with a safety margin.
"""

from __future__ import annotations

import os

CPU_BATCH = 96  # the largest batch measured on CPU (esr-lab bench experiment), the fastest of those
GPU_BATCH = 256  # on a GPU the batch is bounded by memory long before compute (not measured here)
MEMORY_SHARE = 0.25  # of the free memory a batch may take


def bytes_per_row(hf_model, tokens: int, dtype_bytes: int = 4) -> int:
    """KV cache of ``tokens`` positions plus one float32 row of logits."""
    cfg = hf_model.config
    layers = int(cfg.num_hidden_layers)
    heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return 2 * layers * heads * head_dim * tokens * dtype_bytes + int(cfg.vocab_size) * 4


def free_bytes(device) -> int | None:
    """Free memory where the batch lives (GPU memory on CUDA, available RAM on Linux), if known."""
    if str(device).startswith("cuda"):
        import torch  # heavy: torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def auto_batch_size(engine, max_new_tokens: int, prompt_tokens: int = 96) -> int:
    """The batch size an experiment uses when none is given (recorded in its spec)."""
    cap = GPU_BATCH if str(engine.device).startswith("cuda") else CPU_BATCH
    free = free_bytes(engine.device)
    if free is None:
        return cap
    per_row = bytes_per_row(engine.model.hf_model, prompt_tokens + int(max_new_tokens),
                            2 if getattr(engine.model, "dtype", "float32") == "bfloat16" else 4)
    return max(1, min(cap, int(free * MEMORY_SHARE // per_row)))
