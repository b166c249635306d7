"""The resistance circuit and how it shows: episodes, detector and backtracking searches, views.

- ``episodes``: on/off-topic pairs and synthetic recoveries; ``signals``: AUC, Youden, EMA;
- ``detectors``: the contrastive search for off-topic detectors; ``backtracking``: restart latents;
- ``view``: the per-token view of a recovery (regions, ratios, replay); ``live``: while streaming.

May import: core files, models, viz, steering, sae_training, latents, judge.
"""
