"""`python -m bin [--list | BINARY | PRESET] [flags]`: the `plip` command (plip_jax/launcher.py) in a source checkout."""

import sys

from plip_jax.cli.launcher import main

sys.exit(main())
