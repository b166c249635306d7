"""Training the embedded SAEs: the packaged English corpus, cached activations, the trainer, metrics.

- ``sources``: reading the packaged text sources; ``corpus``: the deterministic corpus and its
  held-out split, token windows;
- ``activations``: the float16 activation cache; ``train``: the TopK SAE trainer and export;
- ``metrics``: explained variance, L0, dead latents, CE-loss recovered.

May import: core files, models, viz, steering.
"""
