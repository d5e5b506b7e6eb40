"""Errors the index raises; the service maps each to one gRPC status."""


class SieveError(Exception):
    """Base class: the message is meant for the person who sent the request."""


class InvalidArgument(SieveError, ValueError):
    pass


class NotFound(SieveError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AlreadyExists(SieveError):
    pass


class ResourceExhausted(SieveError):
    pass


class CorruptIndex(SieveError):
    """A file of a collection cannot be read; the message names the file."""


class ReadOnly(SieveError):
    """A write reached a read-only replica."""


class Unavailable(SieveError):
    """The server cannot do this now (still loading, or the disk failed); retrying may succeed."""


class FailedPrecondition(SieveError):
    """The request is well formed but the system is not in a state to do it (e.g. settings changed since)."""
