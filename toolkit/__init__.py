"""The `toolkit` command: a click CLI over the library, and nothing else.

Importing this package is cheap: the commands and the heavy libraries load lazily.
"""

from bundle import __version__

__all__ = ["__version__"]
