"""Segment point clouds and the hybrid Gaussian initialisation.

A segment's Gaussians start from an RGB point cloud built only from the frames the segment may see as input:

- :mod:`evolsplat_ns.pointcloud.options`: :class:`PointCloudOptions` (sparsity, sky filter, depth consistency,
  boxes, ...) and frame selection;
- :mod:`evolsplat_ns.pointcloud.generators`: the ``RGBPointCloudGenerator`` interface and its three sources
  (metric depth maps, LiDAR sweeps, the scene's seed PLY);
- :mod:`evolsplat_ns.pointcloud.filters`: sky masks, depth consistency, box crop / split, statistical outlier
  removal (open3d's definition; open3d, scikit-learn or torch) and uniform down-sampling;
- :mod:`evolsplat_ns.pointcloud.knn`: exact k-nearest-neighbour distances in PyTorch (CPU or CUDA), the torch
  backend of the outlier removal and of the KNN scales;
- :mod:`evolsplat_ns.pointcloud.cache`: the on-disk cache of segment clouds (atomic writes, config hash);
- :mod:`evolsplat_ns.pointcloud.plyio`: PLY reading and writing;
- :mod:`evolsplat_ns.pointcloud.init`: ``init_gaussians`` (means, SH colour, random rotations, opacity,
  KNN log-scales, offsets).

Importing this package imports nothing heavy: open3d is imported inside the functions that use it (and each of
them has a pure numpy / scikit-learn fallback for machines without open3d).

Backends (``PointCloudOptions.backend``): with ``auto`` a cloud is built on the caller's device when that is CUDA
(the model's, in training and inference: reading in threads, colouring, crop, outlier removal, down-sampling and
the KNN scales in PyTorch), otherwise on the CPU as before (open3d's outlier removal, scikit-learn's KNN). Every
backend builds the same cloud, so the backend is not part of the cache key.
"""
