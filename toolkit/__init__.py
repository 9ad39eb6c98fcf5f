"""The `toolkit` command and the bundle contract between host and device.

Importing this package is cheap: the CLI and the heavy libraries load lazily.
"""

__version__ = "0.1.0"
