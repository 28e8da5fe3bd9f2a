"""The Redis backend: several processes or machines share one organization's limits.

``RedisBackend`` (configuration, the wire to Redis, the outbox and its flusher) and the
remote engine it hands a ``Limiter``; ``lua/`` holds one script per operation, each run
atomically by the server. Importing this package imports redis-py: ``ratekeeper[redis]``.
"""
