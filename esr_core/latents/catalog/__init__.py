"""The latent catalog: per-latent evidence for an SAE, Neuronpedia-style, computed offline.

- ``store``: the on-disk format, :class:`~esr_core.latents.catalog.store.Catalog` (loading,
  lazy arrays, feature-page entries) and where catalogs are found (shipped or cached);
- ``evidence``: the one expensive pass over held-out text and chats (density, histograms,
  top contexts, top tokens), resumable;
- ``build``: a whole catalog from a model and an SAE (evidence, logit effects, neighbours,
  offline descriptions), and ``catalog_for`` (shipped, cached or built on demand).

May import: core files, models, sae_training (token packing), latents.descriptions.
"""
