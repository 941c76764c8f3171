import sys

from agent.cli.commands import main

sys.exit(main())
