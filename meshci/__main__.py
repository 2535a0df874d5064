import sys

from meshci.cli import main

sys.exit(main())
