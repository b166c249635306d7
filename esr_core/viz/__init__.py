"""Pictures from data: token heatmaps (escaped HTML), timelines and result figures (plotly).

- ``palette``: the colours and their roles; ``badges``: live event badges;
- ``token_heatmap``, ``timeline``: the steering lab's views of a run;
- ``result_plots``: experiment figures from summaries, and their export.

Pure functions, data in and figure or HTML out; nothing here runs a model.
May import: core files.
"""
