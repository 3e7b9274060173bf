"""Judges: score (prompt, response) pairs; ``harmful`` is what the harmful score counts."""
