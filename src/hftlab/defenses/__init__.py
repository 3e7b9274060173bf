"""Defenses: one file per method, each a :class:`~hftlab.defenses.base.Defense` in the registry."""
