"""Model weights: registry of pinned sources, fetching, conversion to PyTorch and loading."""
