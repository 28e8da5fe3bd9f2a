"""The Redis backend: several processes or machines share one organization's limits.

``RedisBackend`` (configuration, the wire to Redis, the outbox and its flusher) and the
remote engine it hands a ``Limiter``; ``lua/`` holds one script per operation, each run
atomically by the server. Importing this package imports redis-py: ``ratekeeper[redis]``.

The modules, from the bottom up (each imports only those before it, but for the
backend's late import of the engine it makes):

- ``_ops``: what everything here exchanges: ``ScriptCall``, ``Refused``, ``RedisDown``,
  ``PoolKeys``, and ``Backend``, what the engine needs of the backend.
- ``_config``: option checks, the client's options, a URL without its credentials.
- ``_wire``: ``Transport``, round trips (EVALSHA, pipelines, cluster routing), whether
  Redis is up. ``_outbox``: changes left for later and the thread that sends them.
- ``_backend``: ``RedisBackend``, the face of both.
- ``_calls``: each script's arguments, in its order. ``_replies``: each script's reply,
  read into named values.
- ``_pools``: a shared pool's local side, its waiters, its prefetch.
- ``_prefetch``, ``_fallback`` (``on_unavailable="local"``), ``_answers`` (a reserve's
  answer applied to the local line), ``_settlement``, ``_feedback`` (headers and
  statuses to the shared state).
- ``_engine``: ``RemoteEngine``, the admission loops, and what the gate calls.
"""
