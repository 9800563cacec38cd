"""The charge point gateway: OCPP 1.6J and 2.0.1 stations charging under the substations' live allocation."""
