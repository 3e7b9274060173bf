"""User tasks: ``examples(source, split, n)`` and an exact ``score(example, response)``."""
