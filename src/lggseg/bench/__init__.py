"""``lggseg bench``: :mod:`~lggseg.bench.run` (what is measured, ``metrics/bench.json``, the command) and
:mod:`~lggseg.bench.measure` (the timers and each measurement)."""
