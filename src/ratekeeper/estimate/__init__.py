"""Token estimation before a request is sent: the body scan, cache prediction, the estimator.

Pure like the core (no I/O, no event loop): it may import ``ratekeeper.core`` and
``ratekeeper.errors`` and nothing above them.
"""
