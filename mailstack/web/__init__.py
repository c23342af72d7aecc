"""The HTTP(S) service: client set-up documents, the MTA-STS policy, metrics, health."""
