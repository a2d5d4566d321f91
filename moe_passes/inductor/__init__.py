"""The torch.compile backend: Inductor hook-up, custom ops and their lowering."""
