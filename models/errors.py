class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the option (e.g. `model.k`) and the fix."""
