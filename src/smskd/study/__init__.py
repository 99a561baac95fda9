"""Comparing recipes: recipes, sweeps, the results data model, reports, plots, statistics."""
