"""The ``ser`` command: the composition root above web, worker, ser_ml and the hall."""
