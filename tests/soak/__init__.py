"""The chaos soak: the whole worker under steady load while faults are injected on a seeded
random schedule, then a check that no request was lost and every answer is accounted for.

Run it with `make soak` (minutes) or `python -m tests.soak --seconds 60 --seed 7`; `tests/test_soak.py`
runs a short seeded version. Parts: `stack.py` starts and stops the processes and servers,
`faults.py` holds the fault kinds and the schedule, `checks.py` turns what was recorded into
the verdict and the figures, and `__main__.py` runs it all.
"""
