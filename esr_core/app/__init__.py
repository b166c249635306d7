"""What the Streamlit pages call (no streamlit here): sessions, forms, live runs, records, URLs.

- ``session``: models and SAEs on offer, what is loaded, its catalog, shipped groups and examples;
- ``forms``: form input into validated requests; ``latent_view``: a latent's page and search;
- ``live_run``: a streaming run and its per-token values; ``run_record``: a run as JSON;
- ``url_state``: shareable state in the URL.

May import: everything below it (core files through finetune); never cli.
"""
