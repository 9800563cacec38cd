"""Load tester for the Smart Grid Load Balancer: ``python -m load_tester --help``.

Pure modules (no network): scenarios, records, violations, energy, stats,
verdict, plots, report. Network: api (calls to the stack), substations
(samples, records and limits of the substations), runner (sends a run),
compare (one run per routing or allocation policy). cli ties them together.
"""
