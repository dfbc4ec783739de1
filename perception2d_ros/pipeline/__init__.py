"""The ROS-free pipeline: Frame and the Stage protocol (the bottom, importable by the models'
stage modules), configuration (defaults, validation), the stage registry, build and flow
control. May import models/, engines/, geometry/, io/; never ros/ or cli/.
"""
