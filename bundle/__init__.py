"""The host–device contract: the ground floor both sides stand on.

What a bundle is (manifest.py: typed records, one JSON codec; schema.py: the JSON Schema made
from those records), the IO contract of its graphs (contract.py), the one user error type
(errors.py), atomic writes and staging (atomic.py, staging.py), progress lines (progress.py)
and the on-device benchmark's report record (benchreport.py).

This package imports nothing else of the project and nothing outside the standard library, so
the daemon on a board and the converter on a laptop read the same contract.
"""

__version__ = "0.1.0"
