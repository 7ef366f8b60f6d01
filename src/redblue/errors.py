"""Exceptions that end a command with one clear line (exit code 2), never a traceback."""

from __future__ import annotations


class RedblueError(Exception):
    """Base class: a user-facing problem with a message that says what, where and what is expected."""


class ConfigError(RedblueError):
    """A bad option or configuration value."""


class DataError(RedblueError):
    """A dataset file that is missing, truncated, malformed or fails its checksum."""


class IntegrityError(RedblueError):
    """An artifact whose content does not match its recorded SHA-256, or is malformed."""


class ThreatModelError(RedblueError):
    """Adversarial examples outside the eps-ball or outside [0, 1]."""
