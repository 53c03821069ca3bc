"""Embedded synthetic driving scenes: procedural streets, an analytic numpy ray caster, and a writer for the
multi-scene root format (docs/DATA_FORMAT.md). Command line: ``evolsplat-ns-synth``.

World frame of the written data: metres, z up (ground z = 0), x along the street (driving direction), y left.
Camera ids: 0 front, 1 front-left, 2 front-right.
"""

from evolsplat_ns.data.synthetic.raycast import RenderResult
from evolsplat_ns.data.synthetic.scene import CAMERA_NAMES, SyntheticScene, make_scene, opencv_camera_pose
from evolsplat_ns.data.synthetic.writer import generate_scenes, write_scene

__all__ = [
    "CAMERA_NAMES",
    "RenderResult",
    "SyntheticScene",
    "generate_scenes",
    "make_scene",
    "opencv_camera_pose",
    "write_scene",
]
