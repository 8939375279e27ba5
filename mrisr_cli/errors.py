"""Errors whose message is written for the user.

Library code raises :class:`MrisrError` (or a subclass) for anything a user can fix: bad input,
wrong weights, a missing GPU. The CLI layer prints its message as one line on stderr and exits
non-zero; anything else is a bug and is reported as such.
"""


class MrisrError(Exception):
    """A problem the user can fix; the message is one self-contained line."""


class InputError(MrisrError):
    """An input image or folder that mrisr cannot use."""


class WeightsError(MrisrError):
    """A weights file that is missing, corrupt, unsafe or meant for another network."""


class OutputError(MrisrError):
    """An output that cannot or must not be written."""


class DeviceError(MrisrError):
    """A compute device that is unavailable or ran out of memory."""


class MrisrWarning(UserWarning):
    """Something a library caller should know about a result that was still produced (what the
    CLI prints as a warning line), issued through Python's :mod:`warnings` where the function
    has no other channel for it."""
