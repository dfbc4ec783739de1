"""The `make demo` / `perception2d demo` job: the embedded real-camera sequence, the run
(bag make -> nodes -> bag record) and its HTML report. Top layer: may import anything below.
"""
