"""The pure core: buckets, pools, accounting rules, presets, header parsing, feedback, statistics.

Everything here takes time as an argument (``now``) and does no I/O: no event loop, no
clock, no network. It may import only ``ratekeeper.core`` and ``ratekeeper.errors``;
``tests/test_layers.py`` holds it to that.
"""
