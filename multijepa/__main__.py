import sys

from multijepa.cli import main

sys.exit(main())
