import sys

from meshci.soak.run import main

sys.exit(main())
