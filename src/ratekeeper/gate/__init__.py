"""The gate: ``Limiter``, its permits, the wait queue and the local engine.

Requests wait here until every bucket they need admits them. The gate builds on the
core and the estimator; it never imports a backend (``ratekeeper.redis``) or an
integration (``ratekeeper.anthropic``): a backend hands the limiter its engine.
"""
