"""Code both sides import: the wire protocol and what coordinator and agents agree on.

Nothing here imports `coordinator` or `agent` (checked by import-linter).
"""
