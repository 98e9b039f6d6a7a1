"""pg2cio: a Dagster code location that moves a D2C store's commerce truth from PostgreSQL into Customer.io."""

__version__ = "0.1.0"
