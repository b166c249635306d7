"""ESR Lab core library: steering, SAE readout, judging and experiments.

Never imports streamlit: the app's pages are thin layers over this package.
"""

__version__ = "0.1.0"
