"""Client for the Gatehouse job API (mutual TLS, standard library only)."""

from .client import FINAL_STATES, Client, Event, GatehouseError

__all__ = ["Client", "Event", "GatehouseError", "FINAL_STATES"]
