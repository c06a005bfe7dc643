import sys

from qsae.cli import main

sys.exit(main())
