"""`python -m medssl ...` (and `torchrun -m medssl ...`) runs the command line."""

from medssl.cli import main

raise SystemExit(main())
