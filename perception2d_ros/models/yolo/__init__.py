"""YOLO detection: the detector (letterbox, decode of YOLOX / v5 / v8 / v10 outputs, NMS), COCO
class names, the device (torch) decode, and the detect stage.
"""
