"""Optional integrations with other libraries (``celoss.integrations.transformers``: Hugging Face causal LMs).

Each submodule imports its library when it is itself imported; nothing here imports any of them.
"""
