"""Reading checkpoints: formats, families (where each keeps its heads) and hub access.

Nothing here computes a spectrum; everything here treats what it reads as untrusted.
"""
