"""LoRA adapters served as models: the table of loaded adapters (table.py) and their routes (api.py).

The engine side (per-row deltas, the adapter's cache key) is server/engine/lora.py.
"""
