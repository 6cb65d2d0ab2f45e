"""The one exception the data layer raises for bad or missing data."""


class DataError(RuntimeError):
    """A data set is missing, corrupt, or disagrees with the configuration.

    The message always names the offending path or config option and says how to fix it
    (where to get the files, which option to set, or which folder to delete to regenerate).
    It subclasses RuntimeError so DataLoader workers can re-raise it in the main process.
    """


def network_failure(err: BaseException) -> str | None:
    """The reason when `err` (or what caused it) is a failed download: no route, no DNS, refused, timed out, HTTP
    error; None for anything else (e.g. a corrupt file)."""
    import http.client
    import socket
    import ssl
    import urllib.error

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, urllib.error.HTTPError):
            return f"HTTP {seen.code} {seen.reason}"
        if isinstance(seen, urllib.error.URLError):
            return f"{seen.reason}"
        if isinstance(seen, (socket.gaierror, socket.timeout, TimeoutError, ConnectionError, ssl.SSLError,
                             http.client.HTTPException)):
            return f"{type(seen).__name__}: {seen}"
        # torchvision's MNIST tries each mirror and raises RuntimeError("Error downloading <file>: Tried ...")
        if isinstance(seen, RuntimeError) and str(seen).startswith("Error downloading"):
            return str(seen).strip().splitlines()[-1][:200]
        seen = seen.__cause__ or seen.__context__
    return None
