"""Tests against checkpoints written by real producers (torch.optim, schedulers, models)."""
