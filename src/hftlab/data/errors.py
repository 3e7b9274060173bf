"""Errors in user data files: one line naming the file, line and field."""


class DataError(ValueError):
    """A bad data file or record (message: ``file:line: what is wrong``)."""
