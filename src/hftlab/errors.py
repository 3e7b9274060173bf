"""The errors a user causes: the CLI prints them as one line, ``hftlab: error: …``, and exits with 2.

Every such error derives from :class:`UserError` (a bad config value, data file, model path, plugin
name, judge set-up or command-line flag); any other exception is a bug and keeps its traceback. This
module imports nothing from hftlab, so every layer can raise these errors.
"""
from __future__ import annotations


class UserError(Exception):
    """An error in what the user gave (config, file, flag); the message is one line naming the key or file."""


class ConfigError(UserError, ValueError):
    """A bad configuration value; its message is one line naming the key and its origin."""
