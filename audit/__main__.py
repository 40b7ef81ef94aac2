"""``python -m audit`` is the ``bias-audit`` command."""

from audit.cli.main import main

raise SystemExit(main())
