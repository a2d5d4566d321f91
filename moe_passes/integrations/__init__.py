"""Adapters that let libraries users train with hand their MoE code to the passes in one graph.

Each module here is opt-in and named for the library it adapts; nothing is patched on import.
"""
