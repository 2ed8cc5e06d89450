"""Configuration: the domain model, its SQLite store and the service that changes it."""
