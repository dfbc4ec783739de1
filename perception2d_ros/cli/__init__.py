"""The ``perception2d`` command line: one module per command (``cli.main`` dispatches).
Top layer: may import anything below."""
