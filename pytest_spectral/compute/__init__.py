"""Computing singular values: batching per (layer, matrix), the decomposition, cache, device."""
