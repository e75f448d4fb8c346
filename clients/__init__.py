"""Client programs of a running Hearth server (no torch needed): `hearth chat`, `hearth bench`, a test/bench server spawner."""
