"""Passes over torch.fx graphs. Nothing here imports Inductor."""
