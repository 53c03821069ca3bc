"""evolsplat-ns: feed-forward 3D Gaussian Splatting of driving scenes (EVolSplat) as a nerfstudio plugin.

Importing this package is deliberately light: it pulls in neither nerfstudio, open3d nor gsplat.
nerfstudio discovers the method through the entry points declared in ``pyproject.toml``
(``evolsplat_ns.configs``).
"""

__version__ = "0.1.0"
