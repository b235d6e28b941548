"""The lorabus worker process: Kafka I/O, control events, CLI and metrics, on top of `scheduler.Engine`."""

from importlib import metadata


def package_version() -> str:
    """The installed lorabus version (`lorabus --version`, `lorabus_build_info`)."""
    try:
        return metadata.version("lorabus")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"
