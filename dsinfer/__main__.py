"""`python -m dsinfer [--num_gpus N] script.py ...`: the launcher, as the `dsinfer` command.

An entry point, like the console script: nothing imports this module, so it is the one place
under dsinfer/ allowed to reach into dsinfer.tools (tests/test_layering.py exempts it)."""
import sys

from dsinfer.tools.launch import main

if __name__ == "__main__":
    sys.exit(main())
