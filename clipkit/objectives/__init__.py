"""Auxiliary training objectives added to the contrastive loss (the `clipkit.step.Objective` protocol)."""
