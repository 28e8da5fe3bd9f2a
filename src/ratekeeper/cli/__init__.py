"""The ``ratekeeper`` command: ``simulate``, ``emulate``, ``run`` and their shared parsing.

The top layer: it may import anything below it, and nothing imports it.
"""
