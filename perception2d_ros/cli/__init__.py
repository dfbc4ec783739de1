"""The ``perception2d`` command line."""
