"""The HTTP side of MergeShield: FastAPI routes, persistence and pages; it enqueues, never computes.

Empty until the service issue lands; the import-layer contract (service → worker → mergeshield)
is already enforced by ``lint-imports``.
"""
