import sys

from jobs.cli import main

# vLLM spawns its engine processes, which import this module again, so the
# command must only run under this guard.
if __name__ == "__main__":
    sys.exit(main())
