"""Errors every layer raises. Each message names the option or file that is wrong and says how to fix it."""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the option (e.g. `model.k`) and the fix."""


class CapabilityError(TypeError):
    """A method was asked of a model that does not offer what it needs (see core/protocol.py); the message names
    the capability and how to provide it."""
