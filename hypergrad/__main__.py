import sys

from hypergrad.cli import main

sys.exit(main())
