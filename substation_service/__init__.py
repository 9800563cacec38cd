"""A simulated grid substation that admits EV charging sessions up to its capacity."""
from substation_service.app import create_app

__all__ = ["create_app"]
