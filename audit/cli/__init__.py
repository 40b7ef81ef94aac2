"""The ``bias-audit`` command line (``main``), its ``run`` command (``run``); exit codes
are in ``audit.errors``. Commands of the applications (``demo``) come through the
``bias_audit.commands`` entry points."""
