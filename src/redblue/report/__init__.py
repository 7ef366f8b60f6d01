"""Plots and reports, rendered from the JSON result files only."""
