"""The hall shared by the web tier and the workers: settings, database, storage, audio checks,
errors, task names (``contracts``) and enqueueing. Imports no room (web, worker, ser_ml, ser_cli)."""
