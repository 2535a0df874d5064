"""The soak: many requests from several requesters on a local mesh while peers restart
(`tools/soak`, `python -m meshci.soak`): `run.py` drives it, `tally.py` counts (pure)."""
