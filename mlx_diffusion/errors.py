"""The package's error types. Their messages are one line meant for the user: the command lines print them as they
are, with no traceback."""


class Error(Exception):
    """Any mistake mlx_diffusion reports to its user."""

    def __str__(self):
        # names from files (tensor names, JSON keys) may hold line breaks or control characters: shown escaped,
        # so that a message stays one line
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in super().__str__())


class InputError(Error, ValueError):
    """A bad argument: a size, a step count, a setting the model cannot take."""


class WeightsError(Error, ValueError):
    """A checkpoint or model folder that cannot be used: missing, malformed, or unlike what it claims to be."""
