"""Backtracking latents: latents that fire on the restart phrase of a self-correction.

The ESR paper's per-token view (arXiv 2602.06941) follows "backtracking" latents next to the
off-topic detectors. A 135M model rarely corrects itself, so we build synthetic recoveries
(the recipe of its fine-tuning data, ESR_METHOD.md sec. 7): the start of a prompt's own
answer, a drift into another prompt's answer, one restart sentence ("Wait, that's not right.
Let me get back to your question."), then the on-topic answer. Each is run unsteered through
the model; latents are ranked by how much more they fire on restart-phrase tokens than on the
other response tokens. Some restart wordings are held out to check the latents generalise.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from esr_core.errors import BadInput
from esr_core.jobs import Progress, report_fraction
from esr_core.latents.groups import GROUP_FORMAT, LatentGroup, member_descriptions, sae_identity
from esr_core.models.hooks import capture_batches
from esr_core.resistance.detectors import encode
from esr_core.resistance.episodes import RESTART_SENTENCES, build_episodes, load_inputs, render_pair
from esr_core.resistance.signals import rank_auc
from esr_core.viz import palette


@dataclass
class BacktrackingParams:
    n_heldout_variants: int = 2
    start_sentences: int = 1  # sentences of the on-topic answer before the drift
    drift_sentences: int = 3  # sentences of another prompt's answer (the paper's recipe: 2-4)
    max_answer_chars: int = 500
    n_prompts: int | None = None
    answers_path: str | None = None  # None: assets/prompts/default_answers.jsonl
    seed: int = 0
    min_episode_freq: float = 0.5  # fires inside the restart sentence in >= this share of episodes
    min_selectivity: float = 0.8  # mean_restart / (mean_restart + mean_elsewhere)
    max_size: int = 12
    max_elsewhere_tokens: int = 4000  # sampled tokens for the token-level AUC
    batch_size: int = 8
    restart_sentences: list[str] = field(default_factory=lambda: list(RESTART_SENTENCES))

    def validate(self) -> "BacktrackingParams":
        if not 0 <= self.n_heldout_variants < len(self.restart_sentences):
            raise BadInput("Keep at least one restart sentence for the search")
        if not 1 <= self.max_size <= 1000:
            raise BadInput(f"max group size must be in 1..1000, got {self.max_size}")
        return self


def find_backtracking(engine, params: BacktrackingParams | None = None, prompts: list[dict] | None = None,
                      answers: list[str] | None = None, cancel=None,
                      progress: Progress | None = None) -> LatentGroup:
    """Rank latents by activation on restart-phrase tokens vs the rest of the response; return a group."""
    params = (params or BacktrackingParams()).validate()
    t0 = time.time()
    if prompts is None or answers is None:
        prompts, answers = load_inputs(params.n_prompts, 4000, params.answers_path)
    elif params.n_prompts:
        prompts, answers = prompts[: params.n_prompts], answers[: params.n_prompts]
    # at least one search and one held-out episode per variant family
    eps = build_episodes(prompts, answers, params)
    tok = engine.model.tokenizer
    rendered = []
    for ep in eps:
        ids, offs, text, first = render_pair(tok, ep["prompt"], ep["response"], response_only=True)
        base = text.find(ep["response"][:40])
        rs, re_ = ep["restart_span"][0] + base, ep["restart_span"][1] + base
        in_rs = np.array([(e > s) and s < re_ and e > rs for s, e in offs])
        resp = np.zeros(len(ids), dtype=bool)
        resp[first:] = True
        resp[0] = False
        rendered.append((ids, in_rs & resp, resp & ~in_rs))
    d_sae = engine.sae.d_sae
    sums = {k: {"r": np.zeros(d_sae), "e": np.zeros(d_sae), "nr": 0, "ne": 0, "hit": np.zeros(d_sae), "n": 0}
            for k in ("search", "heldout")}
    rng = np.random.default_rng(params.seed)
    tok_r, tok_e = [], []
    quota = max(1, params.max_elsewhere_tokens // max(1, len(eps)))

    def on_batch(done: int, total: int) -> None:
        report_fraction(progress, "forward", done / max(total, 1), f"forward {done}/{total} episodes")

    for i, h in capture_batches(engine.model, engine.hook_name, [r[0] for r in rendered], params.batch_size,
                                cancel, on_batch):
        _, m_r, m_e = rendered[i]
        if not m_r.any() or not m_e.any():
            continue
        z = encode(engine, h).numpy()
        k = "heldout" if eps[i]["heldout"] else "search"
        S = sums[k]
        S["r"] += z[m_r].sum(0)
        S["e"] += z[m_e].sum(0)
        S["nr"] += int(m_r.sum())
        S["ne"] += int(m_e.sum())
        S["hit"] += (z[m_r].max(0) > 0)
        S["n"] += 1
        if k == "search":
            tok_r.append(z[m_r])
            e_idx = np.where(m_e)[0]
            tok_e.append(z[rng.choice(e_idx, size=min(quota, len(e_idx)), replace=False)])
    S = sums["search"]
    if S["n"] == 0:
        raise BadInput("No usable synthetic episode (answers too short?)")
    mean_r, mean_e = S["r"] / S["nr"], S["e"] / S["ne"]
    sel = mean_r / np.maximum(mean_r + mean_e, 1e-12)
    freq = S["hit"] / S["n"]
    ok = np.where((freq >= params.min_episode_freq) & (sel >= params.min_selectivity) & (mean_r > 0))[0]
    members = sorted(map(int, ok), key=lambda i: -(mean_r[i] * sel[i]))[: params.max_size]
    R, E = np.concatenate(tok_r), np.concatenate(tok_e)
    auc = rank_auc(R[:, members], E[:, members]) if members else np.zeros(0)
    H = sums["heldout"]
    stats = {}
    for k, i in enumerate(members):
        row = {"auc_tokens": round(float(auc[k]), 4), "restart_mean": round(float(mean_r[i]), 4),
               "elsewhere_mean": round(float(mean_e[i]), 5),
               "ratio": round(float(mean_r[i] / max(mean_e[i], 1e-3)), 2), "selectivity": round(float(sel[i]), 4),
               "episode_freq": round(float(freq[i]), 4)}
        if H["n"]:
            hr, he = H["r"][i] / max(H["nr"], 1), H["e"][i] / max(H["ne"], 1)
            row.update({"ratio_heldout": round(float(hr / max(he, 1e-3)), 2),
                        "episode_freq_heldout": round(float(H["hit"][i] / H["n"]), 4)})
        stats[str(i)] = row
    return LatentGroup.from_dict({
        "format": GROUP_FORMAT,
        "name": "backtracking",
        "kind": "restart-phrase latents",
        "colour": palette.BACKTRACKING,
        "members": members,
        "weights": [1.0] * len(members),
        "description": (f"Latents that fire on the restart sentence of synthetic self-corrections (on-topic start, "
                        f"drift into another prompt's answer, restart, on-topic answer), {S['n']} search episodes; "
                        f"selectivity >= {params.min_selectivity}, fires in >= {params.min_episode_freq:.0%} of "
                        f"restarts; {H['n']} episodes with held-out wordings. Per-token view of arXiv 2602.06941."),
        "stats": stats,
        "descriptions": member_descriptions(engine, members),
        "params": asdict(params),
        "summary": {"n_episodes": S["n"], "n_heldout_episodes": H["n"], "n_passing": int(len(ok)),
                    "seconds": round(time.time() - t0, 1),
                    "example": eps[0]["response"][:400] if eps else ""},
        "model": engine.model.name,
        "sae": sae_identity(engine),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
