"""Exceptions: one class per `SeerStatus` of the C API.

Every failing library call raises the class of its status, carrying the
library's thread-local message (which names the function and the argument).
Each class also derives from the closest built-in exception, so that code
catching `ValueError` or `OSError` catches the library's equivalents too.
"""


class SeerError(Exception):
    """A seerattn call failed. `status` is the `SeerStatus` code,
    `status_name` its name (`"SEER_INVALID_ARGUMENT"`, ...), `message` the
    library's message."""

    status = None
    status_name = None
    message = None


class InvalidArgumentError(SeerError, ValueError):
    status = 1


class NullPointerError(SeerError, ValueError):
    status = 2


class UnsupportedError(SeerError, NotImplementedError):
    status = 3


class FormatError(SeerError, ValueError):
    status = 4


class SeerIOError(SeerError, OSError):
    status = 5


class BufferTooSmallError(SeerError, ValueError):
    status = 6


class NoDeviceError(SeerError, RuntimeError):
    status = 7


class CudaError(SeerError, RuntimeError):
    status = 8


class PanicError(SeerError, RuntimeError):
    """A bug inside the library, caught at its boundary: please report it."""

    status = 9


_BY_STATUS = {cls.status: cls for cls in SeerError.__subclasses__()}


def error_for(status, status_name, message):
    """The exception for a failed call; a status this package does not know
    (a newer library) is a plain `SeerError`."""
    # One positional argument only: OSError would read two as (errno, strerror).
    err = _BY_STATUS.get(status, SeerError)(f"{status_name}: {message}")
    err.status, err.status_name, err.message = status, status_name, message
    return err
