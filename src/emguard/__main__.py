import sys

from emguard.cli import main

sys.exit(main())
