"""The exceptions that mean "the user handed us something unusable", in one place.

Every error a user can cause and fix (a wrong path, layout, option, config value, image, checkpoint or index)
is a :class:`ReidSslError`. The command line prints such an error as one line and exits with code 2; any other
exception is a bug in reid_ssl (or in a library under it) and is reported as one, with exit code 1 and the
hint to set ``REID_SSL_DEBUG=1`` for the traceback.

Each subclass also derives from the built-in exception that code outside reid_ssl would expect
(``ValueError``, ``FileNotFoundError``, ``KeyError``...), so ``except ValueError`` keeps working for callers
of the library.
"""

from __future__ import annotations


class ReidSslError(Exception):
    """Base class: bad input from the user, with a message that says what is wrong and how to fix it."""

    exit_code = 2  # the command line's exit code for this error

    def __str__(self) -> str:  # KeyError would quote its message; every subclass reads as plain text
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InputError(ReidSslError, ValueError):
    """An option, argument or value that cannot be used."""


class MissingFileError(ReidSslError, FileNotFoundError):
    """A file or folder the user named (or that a default points to) does not exist."""


class AlreadyExistsError(ReidSslError, FileExistsError):
    """The output already exists and would be replaced; the message names the option that allows it."""


class UnknownNameError(ReidSslError, KeyError, ValueError):
    """A name that is not in a registry (a backbone, loss, dataset, index type...); lists the choices."""


class ConfigError(ReidSslError, ValueError):
    """A bad configuration key or value."""


class DatasetLayoutError(ReidSslError, ValueError, FileNotFoundError):
    """A dataset root that is missing or does not have the expected layout."""


class ImageError(ReidSslError, ValueError):
    """An image file that cannot be used (missing, empty, not an image, truncated, too large)."""


class CheckpointError(ReidSslError, ValueError):
    """A file that is not a usable reid_ssl checkpoint, or a run folder whose checkpoint must not be touched."""


class TrainingError(ReidSslError, RuntimeError):
    """Training cannot go on (a diverged loss, a resumed model that does not fit): the run failed. (An unreadable
    image under ``data.bad_images=fail`` is bad input: :class:`ImageError`.)"""

    exit_code = 1


class IndexFormatError(ReidSslError, ValueError):
    """A folder that is not a usable reid_ssl index (missing, wrong format, damaged)."""


class EmbedderMismatchError(ReidSslError, ValueError):
    """The index was built with other weights or preprocessing than the embedder at hand."""


class StaleIndexError(ReidSslError, RuntimeError):
    """Another writer saved the index after this copy was loaded: reload and redo the change."""


class IndexLockedError(ReidSslError, TimeoutError):
    """Another process holds the index's writer lock for longer than we were willing to wait."""


class UploadError(ReidSslError, ValueError):
    """An upload refused as a whole (unsafe or oversized archive, unusable image)."""


class VideoError(ReidSslError, ValueError):
    """A video (or frame folder) that cannot be read, or that holds no usable frame."""


class ResourceLimitError(ReidSslError, MemoryError):
    """A job that would not fit the memory (or another limit) of this machine; the message says what to change."""


class DependencyError(ReidSslError, RuntimeError):
    """A tool or package reid_ssl needs is missing or failed (apt-get, dpkg-deb, an OpenCV build without HOG...)."""

    exit_code = 1


def one_line(e: BaseException) -> str:
    """The exception's message on one line (``KeyError``'s quotes removed); its class name when empty."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(text.split())
    return text or type(e).__name__
