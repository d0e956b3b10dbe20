"""Entry point for ``python -m vlcore``."""

from vlcore.cli import main

raise SystemExit(main())
