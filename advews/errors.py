"""The one exception type the CLIs turn into a one-line message and a non-zero exit."""


class AdvewsError(Exception):
    """A user-facing error: bad input, missing data, unusable output directory."""
