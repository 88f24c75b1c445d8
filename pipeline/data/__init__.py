"""Datasets: the catalog, the synthetic demo world, the prepared layout and torch datasets."""
