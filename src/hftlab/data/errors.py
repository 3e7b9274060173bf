"""Errors in user data files: one line naming the file, line and field."""
from __future__ import annotations

from ..errors import UserError


class DataError(UserError, ValueError):
    """A bad data file or record (message: ``file:line: what is wrong``)."""
