"""Multi-object tracking: the ByteTrack tracker (Kalman filter + lap assignment) and the
track stage.
"""
