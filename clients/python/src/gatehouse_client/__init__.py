"""Client for the Gatehouse job API (mutual TLS on the standard library; fields sealed to the
worker with ``cryptography``)."""

from .client import FINAL_STATES, Client, Event, GatehouseError

__all__ = ["Client", "Event", "GatehouseError", "FINAL_STATES"]
