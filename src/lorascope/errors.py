"""One exception type for user-facing errors: the CLI prints its message on one line and exits non-zero."""


class LorascopeError(Exception):
    """A problem with the user's input (config field, file, model path): the message names it."""


class ConfigError(LorascopeError):
    """A config field is invalid; the message starts with the dotted path of the field."""


class TrainingDiverged(LorascopeError):
    """The training loss blew up (not finite, or far above where it started): a result of the chosen settings
    (e.g. too high a learning rate), which a study records as a diverged run rather than a failed job."""
