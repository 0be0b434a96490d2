"""Errors that pktjax raises for bad input: each names the problem and the fix."""


class PktjaxError(Exception):
    """Base class for pktjax's user-facing errors."""


class CheckpointError(PktjaxError, ValueError):
    """A checkpoint folder or file cannot be read as the model it claims to be."""


class ConfigError(PktjaxError, ValueError):
    """A model or run configuration is missing, inconsistent or unsupported."""


class DataError(PktjaxError, ValueError):
    """A data split or example is missing or malformed."""


class PairError(PktjaxError, ValueError):
    """A teacher and student cannot be paired (vocabulary, size or module mismatch)."""


class DamagedFileError(PktjaxError, ValueError):
    """A file of a run folder fails its recorded checksum, is cut short, or does not parse."""


class LockedError(PktjaxError):
    """Another live job holds the output folder."""


class RemoteError(PktjaxError, OSError):
    """Mirroring a run folder to or from its output URL failed (the network, the bucket's permissions)."""
