"""Code shared by the web tier and the workers: settings, database, storage, audio, features."""
