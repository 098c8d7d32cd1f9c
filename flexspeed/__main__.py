import sys

from flexspeed.cli.main import main

sys.exit(main())
