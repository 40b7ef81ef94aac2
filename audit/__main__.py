"""``python -m audit`` is the ``bias-audit`` command."""

from audit.cli import main

raise SystemExit(main())
