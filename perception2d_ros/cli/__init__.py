"""The ``perception2d`` command line: one module per command. Top layer: may import anything
below; nothing imports it except demo/."""
