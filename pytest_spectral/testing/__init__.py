"""Test aids: small synthetic checkpoints and hypothesis strategies (public)."""
