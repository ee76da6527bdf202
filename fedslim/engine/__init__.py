"""The federation engine: plan -> downlink codec -> client update -> uplink codec -> aggregate."""
