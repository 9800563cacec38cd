"""Load tester for the Smart Grid Load Balancer: ``python -m load_tester --help``.

Pure modules (no network): scenarios, records, violations, stats, verdict,
plots, report. Network: api (calls to the stack), runner (sends a run),
compare (one run per routing policy). cli ties them together.
"""
