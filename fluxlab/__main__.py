import sys

from fluxlab.cli import main

sys.exit(main())
