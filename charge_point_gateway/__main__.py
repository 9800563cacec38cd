"""``python -m charge_point_gateway``: run the gateway with settings from the environment."""
import sys

from charge_point_gateway.app import main

sys.exit(main())
