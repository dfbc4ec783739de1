"""ament_python setup for perception2d (works with colcon and with plain pip)."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "perception2d"

setup(
    name=PACKAGE,
    version="0.1.0",  # keep equal to package.xml
    packages=find_packages(include=["perception2d_ros", "perception2d_ros.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),
        (f"share/{PACKAGE}/models", glob("models/manifest.yaml") + ["models/yolox_nano.onnx"]
         + glob("models/*.jpg") + glob("models/*.md")
         + glob("models/*.txt") + glob("models/*.gz")),
        # the `make demo` / `perception2d demo` sequence (config/demo.yaml names it)
        (f"share/{PACKAGE}/data/demo", glob("data/demo/*.md")),
        (f"share/{PACKAGE}/data/demo/apollo_obstacle", glob("data/demo/apollo_obstacle/*.*")),
        (f"share/{PACKAGE}/data/demo/apollo_obstacle/images",
         glob("data/demo/apollo_obstacle/images/*.jpg")),
        (f"share/{PACKAGE}/data/demo/apollo_obstacle/params",
         glob("data/demo/apollo_obstacle/params/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="perception2d developers",
    maintainer_email="dev@perception2d.invalid",
    description="Real-time 2D perception for ROS 2",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "perception2d = perception2d_ros.cli.main:main",
            "rectify_node = perception2d_ros.ros.rectify_node:main",
            "detector_node = perception2d_ros.ros.detector_node:main",
            "pipeline_node = perception2d_ros.ros.pipeline_node:main",
            "sam_node = perception2d_ros.ros.sam_node:main",
            "clip_node = perception2d_ros.ros.clip_node:main",
            "lseg_node = perception2d_ros.ros.lseg_node:main",
            "track_node = perception2d_ros.ros.track_node:main",
        ],
    },
)
