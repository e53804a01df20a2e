"""User-facing errors: one family, so front ends can show a readable message instead of a trace."""


class WorkbenchError(Exception):
    """Base of every error the workbench raises on purpose (bad input, missing asset, offline)."""


class ConfigError(WorkbenchError, ValueError):
    """A config is malformed: wrong key, wrong type, impossible combination."""


class UnknownComponentError(ConfigError, KeyError):
    """A component name that no registry knows; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return self.args[0] if self.args else ""


class OfflineError(WorkbenchError, RuntimeError):
    """A hub model or dataset was asked for while the hub cannot be reached."""


class ImageError(WorkbenchError, ValueError):
    """An image could not be read safely (corrupt, truncated, empty, too large, not an image)."""


class AssetError(WorkbenchError, FileNotFoundError):
    """An embedded offline asset is not installed."""
