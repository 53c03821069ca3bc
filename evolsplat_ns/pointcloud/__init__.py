"""Segment point clouds and the hybrid Gaussian initialisation.

A segment's Gaussians start from an RGB point cloud built only from the frames the segment may see as input:

- :mod:`evolsplat_ns.pointcloud.options`: :class:`PointCloudOptions` (sparsity, sky filter, depth consistency,
  boxes, ...) and frame selection;
- :mod:`evolsplat_ns.pointcloud.generators`: the ``RGBPointCloudGenerator`` interface and its three sources
  (metric depth maps, LiDAR sweeps, the scene's seed PLY);
- :mod:`evolsplat_ns.pointcloud.filters`: sky masks, depth consistency, box crop / split, statistical outlier
  removal and uniform down-sampling;
- :mod:`evolsplat_ns.pointcloud.cache`: the on-disk cache of segment clouds (atomic writes, config hash);
- :mod:`evolsplat_ns.pointcloud.plyio`: PLY reading and writing;
- :mod:`evolsplat_ns.pointcloud.init`: ``init_gaussians`` (means, SH colour, random rotations, opacity,
  KNN log-scales, offsets).

Importing this package imports nothing heavy: open3d is imported inside the functions that use it (and each of
them has a pure numpy / scikit-learn fallback for machines without open3d).
"""
