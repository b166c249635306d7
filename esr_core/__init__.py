"""ESR Lab core library: steering, SAE readout, judging and experiments (never imports streamlit).

Layers, bottom to top (an import may only point down): the core files ``errors``, ``paths``,
``io``, ``jobs``; then ``models``, ``viz``, ``steering``, ``sae_training``, ``latents``,
``judge``, ``resistance``, ``experiments``; then ``app`` and ``cli``; the Streamlit pages sit
on top. ``tests/test_package_layout.py`` checks it.
"""
