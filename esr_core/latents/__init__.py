"""What each latent means and how to find it: the catalog, labels, search, groups.

- ``catalog/``: per-latent evidence (store, evidence pass, build);
- ``descriptions`` and ``topics``: offline labels from that evidence;
- ``search``: by description and by what fires on a text; ``neuronpedia``: imported labels;
- ``groups``: the one latent-group type (user groups, the resistance circuit, backtracking)
  and ``group_scales``: several latents on one colour scale.

May import: core files, models, viz, steering, sae_training.
"""
