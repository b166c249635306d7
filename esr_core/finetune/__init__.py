"""Inducing resistance by fine-tuning (ESR_METHOD.md sec. 10): synthetic self-corrections,
a LoRA adapter trained with ``peft``, and the splits that keep the evaluation honest.

- ``noticing``: the sentences that notice a drift (every one a restart for the judge);
- ``data``: the training examples (drift sources, masking, splits), built resumably;
- ``train``: the LoRA training loop (seeded, checkpointed, resumable, optionally steered).

May import: core files, models, viz, steering, sae_training, latents, judge, resistance, experiments.
"""
