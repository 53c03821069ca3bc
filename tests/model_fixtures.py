"""A small feed-forward model with one active segment and a source / target batch (the model tests' set-up)."""

import torch

from evolsplat_ns.data.batch import SegmentBatch, Views


def views(xs, H, W, device, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(xs)
    c2w = torch.eye(4).repeat(n, 1, 1)
    c2w[:, 0, 3] = torch.tensor(xs)
    K = torch.eye(4)
    K[0, 0] = K[1, 1] = 0.8 * W
    K[0, 2], K[1, 2] = W / 2, H / 2
    return Views(image=torch.rand(n, H, W, 3, generator=g).to(device), extrinsics=c2w.to(device),
                 intrinsics=K.expand(n, 4, 4).clone().to(device), depth=torch.zeros(n, H, W, device=device),
                 frame_indices=torch.arange(n, device=device), cam_indices=torch.zeros(n, dtype=torch.long,
                                                                                      device=device),
                 keyframe_indices=torch.arange(n, device=device))


def model_and_batch(device="cuda", points=30000, H=96, W=160, **options):
    from nerfstudio.data.scene_box import SceneBox

    from evolsplat_ns.model.evolsplat import EvolSplatModelConfig
    from evolsplat_ns.pointcloud.init import init_gaussians

    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = EvolSplatModelConfig(num_source_views=3, bg_num_points=4000, **options)
    model = cfg.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1,
                      metadata={"num_source_views": 3}).to(dev)
    torch.nn.init.normal_(model.heads.colour[-1].weight, std=0.05)
    pts = torch.rand(points, 3) * torch.tensor([8.0, 4.0, 20.0]) + torch.tensor([-4.0, -2.0, 3.0])
    g = init_gaussians(pts.numpy(), torch.rand(len(pts), 3).numpy(), sh_degree=1, seed=0, device=dev)
    model.segments.activate(0, 0, lambda: {k: g[k] for k in ("means", "colours", "log_scales", "offset")})
    batch = SegmentBatch(0, 0, views([0.0, 0.5, 1.0], H, W, dev, 1), views([0.25, 0.75], H, W, dev, 2), True)
    return model.eval(), batch
