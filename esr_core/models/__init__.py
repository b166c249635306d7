"""Models and SAEs: which models are known, loading them offline, and where activations live.

- ``registry``: the known models, their default SAE and layer (read by the app and the CLI);
- ``loading``: a causal LM once per process (GGUF de-quantised into the user cache, HF ids);
- ``sae``: SAE-Lens folders and pretrained releases, ESR Lab's metadata beside them;
- ``hooks``: hook names, layer resolution, the one residual ``capture`` and ``on_output`` edit;
- ``embeddings``: the offline sentence embedder used by search and the judge.

May import: core files (errors, paths, io, jobs).
"""
