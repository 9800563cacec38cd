"""Benchmarks of Smart Grid Load Balancer: ``make bench`` prints their figures.

They report ratios measured within one run (absolute times depend on the machine).
"""
