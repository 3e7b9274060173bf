"""Evaluation: batched generation, harmful score (HS) and fine-tune accuracy (FA)."""
