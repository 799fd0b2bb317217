"""User-facing errors.

`UsegError` carries one line that names the file or key at fault. The CLI prints it
without a traceback and exits with code 2 (bad input), before any expensive work.
"""


class UsegError(Exception):
    """Bad input or configuration: one clear line, exit code 2."""


class ParamsError(UsegError):
    """An unknown key, a wrong type or an out-of-range value in params.yaml."""


class DataError(UsegError):
    """A corrupt or missing image or mask, a size mismatch, an empty dataset."""


class ArtifactError(UsegError):
    """An artifact with the wrong schema, version or dataset fingerprint."""


class WeightsError(UsegError):
    """A weights file or package whose checksum or layout is not the expected one."""


class DiskFullError(UsegError):
    """A write failed for lack of space (disk full, quota, file-size limit); nothing was written."""
