"""Reporting a run: the JSON report, terminal summary and heatmap, the HTML page."""
