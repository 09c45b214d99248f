import sys

from masqd.cli import main

sys.exit(main())
