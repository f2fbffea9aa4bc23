"""Every failure a user can cause maps to one of these; the CLI prints the message on one line
and exits with the class's code (documented in README.md, "Exit codes"). Anything else is a bug and exits 1."""


class KvcError(Exception):
    exit_code = 1


class InputError(KvcError):
    """Bad arguments or unreadable inputs: a missing file, an empty document, too many tokens."""

    exit_code = 2


class FormatError(KvcError):
    """Bytes that are not a valid .kvc (or profile) file: wrong magic, truncated, bad checksum, bad header."""

    exit_code = 3


class VersionError(FormatError):
    """A file written by a newer major format version than this reader understands."""

    exit_code = 4


class ModelMismatchError(KvcError):
    """The model (or tokenizer) offered does not match the one a file was made with."""

    exit_code = 5


class VerifyError(KvcError):
    """A deep verification found the stored cache unfaithful to a fresh prefill."""

    exit_code = 6


class ProfileError(KvcError):
    """A lossy level needs a profile that is missing, corrupt, or not the one the file names."""

    exit_code = 7


class LimitError(FormatError):
    """Reading would take more memory than allowed (``max_decoded_bytes`` / ``$KVC_MAX_DECODED_BYTES``,
    by default 512 MiB + 1024 × the bytes read): a file may not make its reader allocate what it likes."""

    exit_code = 3


class BatchError(KvcError):
    """A batch finished, but some of its documents failed (each is named in the summary and manifest)."""

    exit_code = 8
