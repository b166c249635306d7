"""ESR Lab Streamlit entry point (placeholder until the app issue lands)."""

import streamlit as st

st.set_page_config(page_title="ESR Lab", layout="wide")
st.title("ESR Lab")
st.write("Endogenous Steering Resistance lab. The full app is being built.")
