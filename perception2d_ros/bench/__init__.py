"""Benchmark harness behind ``perception2d bench``.

* :mod:`.stages`: one stage (rectify / detect / pipeline) driven through a real in-process
  ``PerceptionNode``, message-in → message-out, against the bare primitive measured in the
  same run (the floor);
* :mod:`.dds`: that stage's ``--dds`` runs: the node fed over real DDS, and one image hop
  between two processes;
* :mod:`.replay`: a bag (or real test frames) replayed over DDS at fixed rates and flat out
  through the real nodes, and the overload / soak mode;
* :mod:`.common`: statistics, machine description, real test frames, process CPU/RSS, the
  node under test and its input messages.

Heavy imports (rclpy, onnxruntime, torch) happen inside functions.
"""
