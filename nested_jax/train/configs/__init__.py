"""Packaged train configs (big_vision style): `--config NAME:VARIANT`."""
