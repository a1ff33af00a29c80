"""Project exceptions. The command line turns each into one line on stderr and exit code 2."""

from __future__ import annotations

import os


def one_line(message: str) -> str:
    """``message`` with every run of whitespace (newlines from decoders included) made one space."""
    return " ".join(message.split())


def printable_name(name: str) -> str:
    """A file name as text that any output (CSV, terminal, figure title) can hold: the bytes of a
    name that is not UTF-8, which Python keeps as surrogate escapes, become ``\\xNN``."""
    try:
        return name.encode("utf-8").decode("utf-8")
    except UnicodeEncodeError:
        try:
            return os.fsencode(name).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that no file system byte stands for
            return name.encode("utf-8", "backslashreplace").decode("utf-8")


class BraintumorError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""


class ConfigError(BraintumorError):
    """A setting has a value outside what is accepted."""


class DataError(BraintumorError):
    """A data folder is missing, empty or laid out in a way we cannot read."""


class InvalidImageError(BraintumorError):
    """One image file cannot be decoded; callers usually report it and go on."""


class UnsupportedFileType(InvalidImageError):
    """The bytes are of no type braintumor reads (not an image, DICOM or NIfTI file)."""


class CheckpointError(BraintumorError):
    """A weights or checkpoint file is missing, corrupt or for another model."""
