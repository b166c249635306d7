"""Steering a model: interventions, the request spec, the thread-safe engine, sampling, its bench.

- ``interventions``: add / clamp / scale / ablate, validation, and the maths the hook applies;
- ``spec``: what a generation request is and the events it streams;
- ``engine``: one model + one SAE shared by every session, steering scoped per request;
- ``sampling``: repetition penalty, temperature, top-p; ``bench``: throughput vs plain generate.

May import: core files, models, viz.
"""
