"""The one exception the data layer raises for bad or missing data."""


class DataError(RuntimeError):
    """A data set is missing, corrupt, or disagrees with the configuration.

    The message always names the offending path or config option and says how to fix it
    (where to get the files, which option to set, or which folder to delete to regenerate).
    It subclasses RuntimeError so DataLoader workers can re-raise it in the main process.
    """
