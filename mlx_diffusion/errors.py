"""The package's error types. Their messages are one line meant for the user: the command lines print them as they
are, with no traceback."""


class Error(Exception):
    """Any mistake mlx_diffusion reports to its user."""


class InputError(Error, ValueError):
    """A bad argument: a size, a step count, a setting the model cannot take."""


class WeightsError(Error, ValueError):
    """A checkpoint or model folder that cannot be used: missing, malformed, or unlike what it claims to be."""
