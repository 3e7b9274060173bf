"""Attacks: recipes for the user's fine-tuning data."""
