"""The spool and what drains it: local delivery now, the outbound runner later."""
