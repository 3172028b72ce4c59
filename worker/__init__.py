"""The queue side of MergeShield: a Celery app whose thin tasks call ``mergeshield.pipeline.scan``.

Empty until the service issue lands; the import-layer contract (service → worker → mergeshield)
is already enforced by ``lint-imports``.
"""
