import sys

from espo.app.cli import main

sys.exit(main())
