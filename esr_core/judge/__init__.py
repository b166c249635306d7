"""Judging answers: restart phrases, attempts and their scores, the prompt set.

- ``restart_phrases``: explicit restart language; ``scoring``: the offline judge (attempts,
  0-100 scores, the paper's schema); ``llm``: the optional HTTP judge;
- ``prompts``: our how-to prompts and the default answers; ``calibration``: the judge's sets.

May import: core files, models, viz, steering, sae_training, latents.
"""
