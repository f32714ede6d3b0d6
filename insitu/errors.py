"""Typed errors. Every message names the file or key at fault and says what to do."""

from __future__ import annotations


class InsituError(Exception):
    """Base class of every error insitu raises on purpose."""


class ConfigError(InsituError):
    """A config key is unknown, has the wrong type, or points at a missing path."""


class DataError(InsituError):
    """Input data cannot be used (empty folder, unreadable file, inconsistent geometry)."""


class EmptyDatasetError(DataError):
    """A scan found no usable item."""


class AdapterFormatError(InsituError):
    """An adapter package is malformed: unsafe file type, bad safetensors, invalid insitu.json."""


class SignatureError(AdapterFormatError):
    """A package's signature is missing where one is required, made by an untrusted key, or does not match its files."""


class RegistryError(InsituError):
    """A package registry is malformed, lacks a name, already holds a name, or holds a damaged entry."""


class AdapterMismatchError(InsituError):
    """An adapter package was made for a different base backbone."""

    def __init__(self, message: str, fields: dict[str, tuple[object, object]] | None = None) -> None:
        super().__init__(message)
        self.fields = fields or {}


class NonFiniteLossError(InsituError):
    """Training produced a NaN/Inf loss; the message names the step and the batch's item ids."""


class RunInterrupted(InsituError):
    """A run stopped by a signal (SIGTERM from a scheduler's time limit, SIGINT from Ctrl+C) after saving a checkpoint.

    The command exits ``128 + signum`` (143 for SIGTERM, 130 for SIGINT), as a shell reports a process the signal
    killed, so a workflow script does not carry on as if the run had finished.
    """

    def __init__(self, message: str, signum: int, step: int, checkpoint: str) -> None:
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
