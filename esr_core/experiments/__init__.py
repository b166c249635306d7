"""The paper's experiments: conditions, specs, runs, calibration, summaries, the overlay.

- ``conditions``: the one table of conditions and the edits each makes; ``spec``: a run's spec
  and its trial plan; ``store``: the run folder and trial table;
- ``boost`` / ``calibrate``: probabilistic bisection and calibrating each latent with the model;
- ``runner``: resolve, generate, judge, resume; ``distractors``: choosing distractor latents;
- ``metrics``, ``stats``: flags, Wilson intervals, summaries; ``paper``: the paper's numbers;
- ``report``: summaries, tables and figures for the page and the CLI;
- ``overlay`` / ``overlay_summary``: activity aligned at corrections.

May import: core files, models, viz, steering, sae_training, latents, judge, resistance.
"""
