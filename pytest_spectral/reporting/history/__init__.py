"""A training run's spectral history: reports of successive checkpoints, read one at a time
into a table (``table``), drawn as a page (``page``), for pytest (``--spectral-history``)
and as the ``spectral-history`` command (``command``)."""
