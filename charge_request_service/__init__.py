"""The public charge API: validates charge requests, forwards them to the load balancer, tracks sessions."""
from charge_request_service.app import create_app

__all__ = ["create_app"]
