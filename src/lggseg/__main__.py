"""``python -m lggseg``: the ``lggseg`` console script without an install.

From a source tree (``PYTHONPATH=src python -m lggseg --help``), e.g. on an offline GPU node where
``pip install`` is not possible or not wanted; the commands and their exit codes are those of
:func:`lggseg.cli.main`.
"""

import sys

from lggseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
