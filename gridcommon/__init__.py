"""Small pieces shared by every Smart Grid Load Balancer service.

Kept deliberately small: settings parsing, JSON errors, request ids and
logging, outgoing HTTP with timeouts, and reading Prometheus text.
"""
