"""User-facing errors: one clear line, no traceback needed to understand them."""


class EsrError(Exception):
    """An error whose message is meant for the user (CLI prints it, the app shows it)."""


class ModelUnavailable(EsrError):
    """The model cannot be loaded here (offline and not cached, unknown id, ...)."""


class SaeUnavailable(EsrError):
    """The SAE cannot be loaded (missing or corrupt folder, unknown release, offline)."""


class BadInput(EsrError):
    """A request that cannot be honoured: empty prompt, NaN strength, latent out of range."""


class Cancelled(EsrError):
    """Work stopped because the caller asked it to."""
