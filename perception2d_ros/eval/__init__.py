"""Metrics: COCO detection / mask evaluation and semantic-segmentation metrics and dataset
readers. May import models/, engines/, geometry/, io/; nothing above.
"""
