"""The colours of ESR Lab, in one place: colour-blind-safe (Okabe-Ito) and each with one meaning.

Why fixed roles: a researcher learns once that vermillion is the resistance circuit and blue
the backtracking latents; a watched latent must never borrow one of those, so the latent
palette below leaves the role colours out.
"""

from __future__ import annotations

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]

CIRCUIT = "#D55E00"  # vermillion: the off-topic detectors (resistance circuit)
BACKTRACKING = "#0072B2"  # blue: restart-phrase latents
RESTART = "#CC79A7"  # reddish purple: restart phrases, correction regions
DISTRACTOR = "#E69F00"  # orange: the steered (distractor) latent
GROUP_DEFAULT = "#009E73"  # bluish green: a user's new group
NEUTRAL = "#555555"
LIGHT = "#BBBBBB"
BLACK = "#000000"

# steered vs default answers: the same colours wherever two runs are compared
RUNS = {"steered": DISTRACTOR, "compare": "#8c564b", "default": NEUTRAL}

# watched latents, in order: the Okabe-Ito colours not reserved for a role above
LATENTS = ["#009E73", "#56B4E9", "#F0E442", "#000000", "#882255", "#44AA99", "#999933", "#AA4499"]

REGIONS = {"prompt": LIGHT, "off-topic": DISTRACTOR, "correction": RESTART, "on-topic": GROUP_DEFAULT}
RATES = {"multi_attempt": BACKTRACKING, "esr": CIRCUIT, "improvement": GROUP_DEFAULT, "degraded": RESTART}
ATTEMPT_FILLS = ("rgba(213,94,0,0.13)", "rgba(0,158,115,0.15)", "rgba(0,114,178,0.13)", "rgba(230,159,0,0.15)")

HEATMAP_POSITIVE = "#d62728"
HEATMAP_NEGATIVE = "#1f77b4"


def rgba(hex_colour: str, alpha: float) -> str:
    """``#RRGGBB`` as a CSS ``rgba()`` string."""
    h = str(hex_colour).lstrip("#")
    if len(h) != 6:
        h = "888888"
    r, g, b = (int(h[k:k + 2], 16) for k in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def latent_colour(k: int) -> str:
    """The k-th watched latent's colour (never a role colour)."""
    return LATENTS[k % len(LATENTS)]
