"""The one exception type the CLIs turn into a one-line message and a non-zero exit."""


class AdvewsError(Exception):
    """A user-facing error: bad input, missing data, unusable output directory."""


def require_bool(name: str, value: object) -> None:
    """One line for a gin flag that is not True or False (every layer checks its own flags)."""
    if not isinstance(value, bool):
        raise AdvewsError(f"{name} must be True or False, got {value!r}")
