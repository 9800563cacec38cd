"""The load balancer: routes each charge request to a substation with room for it."""
from load_balancer.app import create_app

__all__ = ["create_app"]
