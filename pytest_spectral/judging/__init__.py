"""Judging spectra: metrics, the power-law fit, rules, baselines, calibration, candidates."""
