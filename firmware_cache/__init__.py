"""ocpp-lc package."""
