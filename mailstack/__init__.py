"""mailstack: one daemon that receives, stores, serves and sends mail for your domain."""

__version__ = "0.1.0"
