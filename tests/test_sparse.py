"""The project's sparse convolution backend and sparse volume sampling (evolsplat_ns.model.sparse).

Every op is checked against dense ``torch.nn.functional`` convolutions on small random grids (values and
gradients), the U-Net against a dense re-implementation, sparse sampling against the reference's dense
``grid_sample`` path. All CPU tests are float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evolsplat_ns.model.sparse import igemm
from evolsplat_ns.model.sparse import (
    CoordIndex,
    KernelMapCache,
    SparseConv3d,
    SparseTensor,
    SparseUNet,
    build_downsample_map,
    build_submanifold_map,
    dense_weight_to_sparse,
    kernel_offsets,
    sample_sparse_volume,
    sample_volume,
    sparse_conv,
    sparse_conv3d,
    sparse_weight_to_dense,
    voxelize,
)
from sparse_fixtures import street_voxels

DT = torch.float64
cpu_interpreter = pytest.mark.skipif(not igemm.interpreting(),
                                     reason="Triton not in interpreter mode (the GPU run has its own test)")


# ---------------------------------------------------------------------------------------------------- helpers
def random_coords(shape=(12, 12, 12), p=0.3, batch=1, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        occ = torch.rand(shape, generator=g) < p
        xyz = occ.nonzero()
        rows.append(torch.cat([torch.full((len(xyz), 1), b, dtype=torch.long), xyz], 1))
    c = torch.cat(rows)
    c = c[torch.randperm(len(c), generator=g)]  # unsorted input rows on purpose
    return c.to(device)


def to_dense(feats, coords, shape, batch):
    out = feats.new_zeros((batch, feats.shape[1], *shape))
    out[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]] = feats  # differentiable w.r.t. feats
    return out


def at(dense, coords):
    return dense[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]]


def occupancy(coords, shape, batch):
    m = torch.zeros((batch, *shape), dtype=torch.bool)
    m[coords[:, 0], coords[:, 1], coords[:, 2], coords[:, 3]] = True
    return m


def grads(loss, *ts):
    return torch.autograd.grad(loss, ts)


# ---------------------------------------------------------------------------------------------------- layout
def test_kernel_offset_ordering_and_weight_layout():
    off = kernel_offsets(3)
    assert off.shape == (27, 3)
    for w, (a, b, c) in enumerate(off.tolist()):
        assert w == a + 3 * b + 9 * c  # x fastest (torchsparse 2.1)
    W = torch.randn(27, 4, 5, dtype=DT)
    D = sparse_weight_to_dense(W)
    assert D.shape == (5, 4, 3, 3, 3)
    assert torch.equal(D[:, :, 2, 0, 1], W[2 + 9].t())
    Dt = sparse_weight_to_dense(W, transposed=True)
    assert torch.equal(Dt[:, :, 1, 2, 0], W[1 + 6])
    assert torch.equal(dense_weight_to_sparse(D), W)
    assert torch.equal(dense_weight_to_sparse(Dt, transposed=True), W)


@pytest.mark.parametrize("dense_cells", [0, 1 << 26], ids=["sorted-keys", "dense-table"])
def test_coord_index_lookup(dense_cells):
    c = random_coords((9, 9, 9), 0.2, batch=2, seed=1)
    c[:, 1] -= 3  # negative coordinates are fine for the hash
    idx = CoordIndex(c, dense_cells=dense_cells)
    assert (idx.table is not None) == (dense_cells > 0)
    assert torch.equal(idx.lookup(c), torch.arange(len(c)))
    occ = {tuple(r) for r in c.tolist()}
    q = torch.cat([torch.randint(0, 2, (500, 1)), torch.randint(-6, 12, (500, 3))], 1)
    got = idx.lookup(q)
    for r, g in zip(q.tolist(), got.tolist()):
        assert (g >= 0) == (tuple(r) in occ)
        if g >= 0:
            assert c[g].tolist() == r
    offs = torch.cat([torch.zeros(27, 1, dtype=torch.long), kernel_offsets(3) - 1], 1)
    tab = idx.lookup_offsets(c, offs)
    assert torch.equal(tab, idx.lookup(c[:, None, :] + offs[None]))
    # bases outside the box whose offset corners fall inside (sampling below the lowest voxel)
    q = torch.cat([torch.randint(0, 2, (300, 1)), torch.randint(-8, 13, (300, 3))], 1)
    assert torch.equal(idx.lookup_offsets(q, offs), idx.lookup(q[:, None, :] + offs[None]))


@cpu_interpreter
def test_fused_neighbour_lookup_equals_the_pytorch_one():
    """The one-kernel look-up (:mod:`evolsplat_ns.model.sparse.fused_maps`) gives the PyTorch path's neighbour table,
    in a box with negative coordinates and two batch items, for queries whose neighbours fall outside the box, and
    row counts that are not a multiple of its block; where it does not apply (a sorted-key index) the PyTorch path
    runs."""
    c = random_coords((9, 9, 9), 0.2, batch=2, seed=1)
    c[:, 1] -= 3
    offs = torch.cat([torch.zeros(27, 1, dtype=torch.long), kernel_offsets(3) - 1], 1)
    idx = CoordIndex(c)
    q = torch.cat([torch.randint(0, 2, (301, 1)), torch.randint(-8, 13, (301, 3))], 1)
    for query in (c, q):
        fused = idx.lookup_offsets(query, offs, fused=True)
        assert fused.dtype == torch.int32 and torch.equal(fused.long(), idx.lookup_offsets(query, offs))
    sorted_idx = CoordIndex(c, dense_cells=0)
    assert torch.equal(sorted_idx.lookup_offsets(c, offs, fused=True), idx.lookup_offsets(c, offs))
    km_f = KernelMapCache(fused_lookup=True).submanifold(c, 1)
    km_t = KernelMapCache().submanifold(c, 1)
    assert torch.equal(km_f.table, km_t.table)
    pts = torch.rand(2000, 3, dtype=DT)  # the model's voxel grid hands the option to its cache (fused_kernel_maps)
    grids = [voxelize(pts, pts.clone(), 0.1, fused_lookup=flag) for flag in (False, True)]
    assert [v.kernel_maps.fused_lookup for v in grids] == [False, True]
    net = SparseUNet().double()
    vols = [net(v.tensor(), cache=v.kernel_maps) for v in grids]
    torch.testing.assert_close(vols[0].feats, vols[1].feats, rtol=0, atol=0)
    probe = torch.cat([pts[:500] + 0.03, torch.rand(50, 3, dtype=DT) * 3 - 1])  # some outside the grid
    torch.testing.assert_close(*(sample_volume(vol, v, probe) for vol, v in zip(vols, grids)), rtol=0, atol=0)


@cpu_interpreter
@pytest.mark.parametrize("batch,ranged,k", [(1, False, 3), (2, True, 3), (2, False, 2), (1, True, 3)])
def test_fused_strided_map_equals_the_pytorch_one(batch, ranged, k):
    """The three-kernel strided map (:func:`evolsplat_ns.model.sparse.fused_maps.downsample_dense`): the same output
    coordinates (torchsparse's rule, sorted), the same neighbour table and the same coarse range as the PyTorch
    path, with and without a spatial range, for two batch items, another kernel size, and inputs too few to
    produce any output."""
    c = random_coords((11, 9, 10), 0.25, batch=batch, seed=3)
    rng = (12, 10, 11) if ranged else None
    for coords in (c, c[:1] * 0):  # the second: one voxel at the origin of a 1-voxel box -> no output
        km_t, out_t, r_t = build_downsample_map(coords, k, 2, rng)
        km_f, out_f, r_f = build_downsample_map(coords, k, 2, rng, fused=True)
        assert torch.equal(out_f, out_t) and r_f == r_t
        assert km_f.table.dtype == torch.int32 and torch.equal(km_f.table, km_t.table)
        assert torch.equal(km_f.inverse(), km_t.inverse())  # the fused one was written with the table
        if len(out_f):  # the output rows' index, built with the map: the answers of indexing the rows
            fresh, given = CoordIndex(out_t), km_f.output_index
            offs = torch.cat([torch.zeros(27, 1, dtype=torch.long), kernel_offsets(3) - 1], 1)
            q = torch.cat([torch.randint(0, batch + 1, (200, 1)), torch.randint(-2, 8, (200, 3))], 1)
            assert torch.equal(given.lookup(out_t), torch.arange(len(out_t)))
            assert torch.equal(given.lookup(q), fresh.lookup(q))
            assert torch.equal(given.lookup_offsets(out_t, offs), fresh.lookup_offsets(out_t, offs))
    assert len(build_downsample_map(c, k, 2, rng)[1]) > 0
    caches = [KernelMapCache(fused_lookup=flag) for flag in (False, True)]
    maps = [cache.downsample(c, 1, k, 2, rng) for cache in caches]
    assert torch.equal(maps[0][0].table, maps[1][0].table) and torch.equal(maps[0][1], maps[1][1])
    assert caches[1].coord_index(2) is maps[1][0].output_index  # the next level's hash: no host read
    sub = [cache.submanifold(m[1], 2, 3, m[2]) for cache, m in zip(caches, maps)]
    assert torch.equal(sub[0].table, sub[1].table)


@pytest.mark.gpu
def test_fused_neighbour_lookup_cuda_equals_the_pytorch_one():
    """On the GPU (compiled Triton): the fused submanifold and strided maps of a ~140 k-voxel cloud equal the
    PyTorch ones at every stride of the U-Net, the U-Net's output with them is the same, and so are the volume's
    samples with the fused corner look-up."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(0)
    c = street_voxels(g, "cuda")
    f = torch.randn(len(c), 3, generator=g).cuda()
    net = SparseUNet(3, 16).cuda().eval()
    caches = {flag: KernelMapCache(fused_lookup=flag) for flag in (False, True)}
    with torch.no_grad():
        out = {flag: net(SparseTensor(f, c), cache=cache).feats for flag, cache in caches.items()}
    assert torch.equal(out[True], out[False])
    probe = c[:, 1:].float() + torch.rand(len(c), 3, device="cuda")  # in and between the voxels (voxel size 1)
    corners = {flag: sample_sparse_volume(out[False], c, probe, 1.0, [0.0, 0.0, 0.0], index=cache.coord_index(1),
                                          fused_lookup=flag) for flag, cache in caches.items()}
    assert torch.equal(corners[True], corners[False])
    assert caches[False].strides() == caches[True].strides()
    for stride in caches[False].strides():
        assert torch.equal(caches[False].coords(stride), caches[True].coords(stride)), stride
        a, b = (caches[flag].submanifold(caches[flag].coords(stride), stride) for flag in (False, True))
        assert torch.equal(a.table, b.table), stride
        if stride < max(caches[False].strides()):
            a, b = (caches[flag].downsample(caches[flag].coords(stride), stride)[0] for flag in (False, True))
            assert torch.equal(a.table, b.table) and torch.equal(a.inverse(), b.inverse()), stride


# ---------------------------------------------------------------------------------------------------- conv ops
@pytest.mark.parametrize("batch", [1, 2])
def test_submanifold_conv_matches_dense(batch):
    shape = (12, 12, 12)
    c = random_coords(shape, 0.3, batch, seed=2)
    f = torch.randn(len(c), 3, dtype=DT, requires_grad=True)
    W = torch.randn(27, 3, 5, dtype=DT, requires_grad=True)
    y = sparse_conv3d(SparseTensor(f, c), W)
    assert torch.equal(y.coords, c) and y.stride == 1
    yd = at(F.conv3d(to_dense(f, c, shape, batch), sparse_weight_to_dense(W), padding=1), c)
    torch.testing.assert_close(y.feats, yd, rtol=1e-12, atol=1e-12)
    G = torch.randn_like(yd)
    for a, b in zip(grads((y.feats * G).sum(), f, W), grads((yd * G).sum(), f, W)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def dense_down_coords(c, shape, batch, k=3, s=2):
    """Independent statement of torchsparse 2.1's rule: non-empty outputs of a dense valid conv over [0, M]."""
    M = c[:, 1:].max(0).values
    occ = occupancy(c, shape, batch)[:, None, : M[0] + 1, : M[1] + 1, : M[2] + 1].to(DT)
    hit = F.conv3d(occ, torch.ones(1, 1, k, k, k, dtype=DT), stride=s)[:, 0] > 0
    return hit.nonzero(), M


@pytest.mark.parametrize("batch", [1, 2])
def test_strided_conv_matches_dense(batch):
    shape = (12, 11, 12)
    c = random_coords(shape, 0.25, batch, seed=3)
    f = torch.randn(len(c), 4, dtype=DT, requires_grad=True)
    W = torch.randn(27, 4, 6, dtype=DT, requires_grad=True)
    y = sparse_conv3d(SparseTensor(f, c), W, stride=2)
    want, M = dense_down_coords(c, shape, batch)
    assert y.stride == 2
    assert torch.equal(y.coords, want)  # same set, sorted (b, x, y, z)
    xd = to_dense(f, c, shape, batch)[..., : M[0] + 1, : M[1] + 1, : M[2] + 1]
    yd = at(F.conv3d(xd, sparse_weight_to_dense(W), stride=2), y.coords)
    torch.testing.assert_close(y.feats, yd, rtol=1e-12, atol=1e-12)
    G = torch.randn_like(yd)
    for a, b in zip(grads((y.feats * G).sum(), f, W), grads((yd * G).sum(), f, W)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_strided_output_rule_by_hand():
    # M = 4 per axis -> outputs 0..(4-2)//2 = 1; voxel 4 feeds o = 1 (d = 2) and o = 2 (dropped), voxel 0 feeds o = 0.
    c = torch.tensor([[0, 0, 0, 0], [0, 4, 4, 4]])
    km, out, _ = build_downsample_map(c)
    assert out.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1]]
    i, o, w = km.pairs()
    assert sorted(zip(i.tolist(), o.tolist(), w.tolist())) == [(0, 0, 0), (1, 1, 26)]
    # odd far border: M = 5 -> voxel 5 reaches only o = 2 > (5-2)//2 = 1: no output at all from it
    c = torch.tensor([[0, 0, 0, 0], [0, 5, 5, 5]])
    _, out, _ = build_downsample_map(c)
    assert out.tolist() == [[0, 0, 0, 0]]
    # a spatial_range replaces the data maximum
    _, out, rng = build_downsample_map(c, spatial_range=(8, 8, 8))
    assert out.tolist() == [[0, 0, 0, 0], [0, 2, 2, 2]] and rng == (3, 3, 3)


def test_transposed_conv_matches_dense():
    shape, batch = (12, 12, 10), 2
    c = random_coords(shape, 0.3, batch, seed=4)
    x = SparseTensor(torch.randn(len(c), 4, dtype=DT), c)
    coarse = sparse_conv3d(x, torch.randn(27, 4, 6, dtype=DT), stride=2)
    fc = torch.randn(coarse.num_voxels, 6, dtype=DT, requires_grad=True)
    W = torch.randn(27, 6, 5, dtype=DT, requires_grad=True)
    y = sparse_conv3d(coarse.replace(fc), W, stride=2, transposed=True)
    assert torch.equal(y.coords, c) and y.stride == 1
    cshape = (coarse.coords[:, 1:].max(0).values + 1).tolist()
    yd = F.conv_transpose3d(to_dense(fc, coarse.coords, cshape, batch), sparse_weight_to_dense(W, True), stride=2)
    pad = [0, max(0, shape[2] - yd.shape[4]), 0, max(0, shape[1] - yd.shape[3]), 0, max(0, shape[0] - yd.shape[2])]
    yd = at(F.pad(yd, pad), c)
    torch.testing.assert_close(y.feats, yd, rtol=1e-12, atol=1e-12)
    G = torch.randn_like(yd)
    for a, b in zip(grads((y.feats * G).sum(), fc, W), grads((yd * G).sum(), fc, W)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_hand_written_backward_gradcheck():
    c = random_coords((5, 5, 5), 0.4, 1, seed=5)
    x = SparseTensor(torch.randn(len(c), 2, dtype=DT), c)
    sub = x.cache.submanifold(c, 1)
    down, cc, _ = x.cache.downsample(c, 1)
    f = torch.randn(len(c), 2, dtype=DT, requires_grad=True)
    fc = torch.randn(len(cc), 2, dtype=DT, requires_grad=True)
    W = torch.randn(27, 2, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: sparse_conv(a, w, sub), (f, W))
    assert torch.autograd.gradcheck(lambda a, w: sparse_conv(a, w, down), (f, W))
    assert torch.autograd.gradcheck(lambda a, w: sparse_conv(a, w, down, transposed=True), (fc, W))


def test_chunked_groups_give_the_same_convolution():
    """Groups cut into many small chunks (several per weight) compute the same conv, values and gradients."""
    c = random_coords((12, 12, 12), 0.3, 1, seed=13)
    idx = CoordIndex(c)
    one = build_submanifold_map(c, idx, min_chunk=10**9)
    many = build_submanifold_map(c, idx, min_chunk=1)
    assert one.in_idx.shape[0] == 26 and many.in_idx.shape[0] > 26 and many.ks.unique().numel() == 26
    down_one, _, _ = build_downsample_map(c, min_chunk=10**9)
    down_many, _, _ = build_downsample_map(c, min_chunk=1)
    assert down_many.in_idx.shape[0] > down_one.in_idx.shape[0]
    for a_map, b_map, n_in, transposed in [(one, many, len(c), False), (down_one, down_many, len(c), False),
                                           (down_one, down_many, down_one.n_out, True)]:
        f = torch.randn(n_in, 3, dtype=DT, requires_grad=True)
        W = torch.randn(27, 3, 4, dtype=DT, requires_grad=True)
        ya, yb = sparse_conv(f, W, a_map, transposed), sparse_conv(f, W, b_map, transposed)
        torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
        G = torch.randn_like(ya)
        for u, v in zip(grads((ya * G).sum(), f, W), grads((yb * G).sum(), f, W)):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_split_weight_gradient_reduction():
    from evolsplat_ns.model.sparse.ops import _grouped_weight_grad

    a, g = torch.randn(3, 4096, 5, dtype=DT), torch.randn(3, 4096, 7, dtype=DT)
    torch.testing.assert_close(_grouped_weight_grad(a, g), torch.bmm(a.transpose(1, 2), g))
    a, g = a[:, :1001], g[:, :1001]  # odd length: no split
    torch.testing.assert_close(_grouped_weight_grad(a, g), torch.bmm(a.transpose(1, 2), g))


# ---------------------------------------------------------------------------------------------------- U-Net
def dense_unet(net: SparseUNet, x0, mask0):
    """The same network on dense volumes: convs on masked grids, BN statistics over the active voxels."""

    def bn_relu(bn, y, mask):
        v = y.permute(1, 0, 2, 3, 4)[:, mask]  # [C, n_active]
        mean, var = v.mean(1), v.var(1, unbiased=False)
        sh = (1, -1, 1, 1, 1)
        y = (y - mean.view(sh)) / torch.sqrt(var.view(sh) + bn.eps) * bn.weight.view(sh) + bn.bias.view(sh)
        return F.relu(y) * mask[:, None]

    def subm(blk, y, mask):
        conv, bn = blk.net[0], blk.net[1]
        return bn_relu(bn, F.conv3d(y, sparse_weight_to_dense(conv.kernel), padding=1) * mask[:, None], mask)

    def down(blk, y, mask):
        conv, bn = blk.net[0], blk.net[1]
        M = mask.nonzero()[:, 1:].max(0).values
        y, m = y[..., : M[0] + 1, : M[1] + 1, : M[2] + 1], mask[:, : M[0] + 1, : M[1] + 1, : M[2] + 1]
        m2 = F.conv3d(m[:, None].to(y.dtype), torch.ones(1, 1, 3, 3, 3, dtype=y.dtype), stride=2)[:, 0] > 0
        z = F.conv3d(y, sparse_weight_to_dense(conv.kernel), stride=2) * m2[:, None]
        return bn_relu(bn, z, m2), m2

    def up(blk, y, fine_mask):
        conv, bn = blk.net[0], blk.net[1]
        z = F.conv_transpose3d(y, sparse_weight_to_dense(conv.kernel, transposed=True), stride=2)
        S = fine_mask.shape[1:]
        z = F.pad(z, [0, max(0, S[2] - z.shape[4]), 0, max(0, S[1] - z.shape[3]), 0, max(0, S[0] - z.shape[2])])
        z = z[..., : S[0], : S[1], : S[2]] * fine_mask[:, None]
        return bn_relu(bn, z, fine_mask)

    a0 = subm(net.conv0, x0 * mask0[:, None], mask0)
    a1, m1 = down(net.conv1, a0, mask0)
    a2 = subm(net.conv2, a1, m1)
    a3, m3 = down(net.conv3, a2, m1)
    a4 = subm(net.conv4, a3, m3)
    a5, m5 = down(net.conv5, a4, m3)
    a6 = subm(net.conv6, a5, m5)
    y = up(net.conv7, a6, m3) + a4
    y = up(net.conv9, y, m1) + a2
    y = up(net.conv11, y, mask0) + a0
    return y


def test_unet_matches_dense_reimplementation():
    torch.manual_seed(0)
    shape, batch = (32, 30, 28), 2
    c = random_coords(shape, 0.08, batch, seed=6)
    net = SparseUNet(3, 16).double().train()
    for m in net.modules():  # non-trivial affine BN parameters
        if isinstance(m, torch.nn.BatchNorm1d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    f = torch.randn(len(c), 3, dtype=DT)
    y = net(SparseTensor(f, c))
    assert torch.equal(y.coords, c) and y.feats.shape == (len(c), 16)
    G = torch.randn_like(y.feats)
    params = [p for p in net.parameters()]
    gs = grads((y.feats * G).sum(), *params)
    yd = at(dense_unet(net, to_dense(f, c, shape, batch), occupancy(c, shape, batch)), c)
    gd = grads((yd * G).sum(), *params)
    torch.testing.assert_close(y.feats, yd, rtol=1e-9, atol=1e-9)
    for (name, _), a, b in zip(net.named_parameters(), gs, gd):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=lambda m: f"{name}: {m}")


def test_unet_state_dict_keys_match_reference_layout():
    sd = SparseUNet(3, 16).state_dict()
    assert sd["conv0.net.0.kernel"].shape == (27, 3, 16)
    assert sd["conv7.net.0.kernel"].shape == (27, 64, 32)
    assert sd["conv11.net.0.kernel"].shape == (27, 16, 16)
    assert "conv5.net.1.running_var" in sd and "conv8.net.0.kernel" not in sd


def test_kernel_map_cache_reused_across_forwards():
    torch.manual_seed(1)
    c = random_coords((20, 20, 20), 0.1, 1, seed=7)
    f = torch.randn(len(c), 3, dtype=DT)
    net = SparseUNet().double().eval()
    cache = KernelMapCache()
    y1 = net(SparseTensor(f, c), cache=cache)
    built = dict(cache.builds)
    assert built == {"index": 4, "subm": 4, "down": 3}
    y2 = net(SparseTensor(f, c.clone()), cache=cache)  # a new but equal coordinate tensor: still a hit
    assert dict(cache.builds) == built and cache.invalidations == 0
    assert torch.equal(y1.feats, y2.feats)
    hits = cache.hits
    y3 = net(SparseTensor(f, c), cache=cache)
    assert dict(cache.builds) == built and cache.hits == hits + 10  # 4 subm + 3 down + 3 transposed
    assert torch.equal(y1.feats, y3.feats)
    y_fresh = net(SparseTensor(f, c))  # no cache: same result
    assert torch.equal(y1.feats, y_fresh.feats)
    # other coordinates invalidate the cache instead of silently reusing wrong maps
    c2 = random_coords((20, 20, 20), 0.1, 1, seed=8)
    y4 = net(SparseTensor(torch.randn(len(c2), 3, dtype=DT), c2), cache=cache)
    assert cache.invalidations == 1 and torch.equal(y4.coords, c2)


# ---------------------------------------------------------------------------------------------------- voxeliser
def test_voxelize_points_mean_and_point2voxel():
    pts = torch.tensor([[0.01, 0.02, 0.03], [0.09, 0.05, 0.05], [0.25, 0.0, 0.0], [-0.01, 0, 0], [1.05, 0, 0]],
                       dtype=DT)
    feats = torch.tensor([[1.0], [3.0], [5.0], [7.0], [9.0]], dtype=DT)
    x, p2v = SparseTensor.from_points(pts, 0.1, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), feats=feats)
    assert x.coords.tolist() == [[0, 0, 0, 0], [0, 2, 0, 0]]
    assert x.feats.squeeze(1).tolist() == [2.0, 5.0]
    assert p2v.tolist() == [0, 0, 1, -1, -1]  # outside the box: dropped
    g = voxelize(pts[:3], feats[:3], 0.1)
    assert g.grid_shape[0] == 3 and (g.point2voxel >= 0).all()


# ---------------------------------------------------------------------------------------------------- sampling
def make_volume(shape=(10, 12, 9), p=0.35, C=4, seed=9):
    c = random_coords(shape, p, 1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return c, torch.randn(len(c), C, dtype=DT, generator=g)


def test_sampling_value_convention():
    c = torch.tensor([[0, 2, 3, 4], [0, 3, 3, 4]])
    f = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=DT)
    lo, vs = torch.tensor([-1.0, 0.5, 2.0], dtype=DT), 0.2
    corner = lo + torch.tensor([2.0, 3, 4], dtype=DT) * vs  # voxel (2,3,4) sits at its min corner
    pts = torch.stack([corner, corner + torch.tensor([0.5 * vs, 0, 0], dtype=DT),
                       corner + torch.tensor([0, 0.5 * vs, 0], dtype=DT)])
    out = sample_sparse_volume(f, c, pts, vs, lo)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]], dtype=DT))
    bad = torch.tensor([[float("nan"), 0.0, 0.0], [float("inf"), 1.0, 1.0]], dtype=DT)
    assert torch.equal(sample_sparse_volume(f, c, bad, vs, lo), torch.zeros(2, 2, dtype=DT))


@pytest.mark.parametrize("convention", ["exact", "reference"])
def test_sparse_sampling_equals_dense_grid_sample(convention):
    shape = (10, 12, 9)  # non-cubic: catches axis-order mistakes
    c, f = make_volume(shape)
    lo, vs = torch.tensor([3.0, -2.0, 0.5], dtype=DT), 0.3
    g = torch.Generator().manual_seed(10)
    S = torch.tensor(shape, dtype=DT)
    u = torch.rand(600, 3, generator=g, dtype=DT) * (S + 2) - 1  # inside, on and beyond the borders
    ints = torch.cat([c[:40, 1:].to(DT), torch.zeros(1, 3, dtype=DT), (S - 1)[None]])  # exact voxel positions
    empty = (torch.rand(60, 3, generator=g, dtype=DT) * (S - 1)).floor() + 0.5  # many next to empty voxels
    u = torch.cat([u, ints, empty, (S - 1)[None] - 1e-9, torch.tensor([[0.0, 5.5, S[2] - 1]], dtype=DT)])
    pts = lo + u * vs
    sp = sample_sparse_volume(f, c, pts, vs, lo, grid_shape=shape, convention=convention)
    dn = sample_sparse_volume(f, c, pts, vs, lo, grid_shape=shape, mode="dense", convention=convention)
    torch.testing.assert_close(sp, dn, rtol=1e-10, atol=1e-10)
    assert (sp.abs().sum(1) > 0).sum() > 400
    # gradients w.r.t. features and points agree too (random, non-integer points)
    pts_r = (lo + u[:600] * vs).requires_grad_(True)
    fr = f.clone().requires_grad_(True)
    G = torch.randn(600, f.shape[1], dtype=DT)
    a = grads((sample_sparse_volume(fr, c, pts_r, vs, lo, shape, convention=convention) * G).sum(), fr, pts_r)
    b = grads((sample_sparse_volume(fr, c, pts_r, vs, lo, shape, "dense", convention=convention) * G).sum(), fr,
              pts_r)
    torch.testing.assert_close(a[0], b[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a[1], b[1], rtol=1e-7, atol=1e-7)


def test_sample_volume_with_voxel_grid_and_unet_output():
    torch.manual_seed(2)
    pts = torch.rand(3000, 3, dtype=DT) * torch.tensor([3.0, 3.0, 1.0], dtype=DT)
    vox = voxelize(pts, torch.rand(3000, 3, dtype=DT), 0.1)
    net = SparseUNet().double()
    vol = net(vox.tensor(), cache=vox.kernel_maps)
    q = pts[:500] + 0.03
    a = sample_volume(vol, vox, q, mode="sparse")
    b = sample_volume(vol, vox, q, mode="dense")
    assert a.shape == (500, 16)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert vox.kernel_maps.builds["index"] == 4  # sampling reused the stride-1 hash of the U-Net
    frozen = net(vox.tensor(), cache=vox.kernel_maps).detach()  # the model's frozen-volume path
    assert not frozen.feats.requires_grad and vox.kernel_maps.builds["index"] == 4
    torch.testing.assert_close(sample_volume(frozen, vox, q), a.detach())


def test_huge_box_sparse_only():
    """5000^3 voxels (a dense 16-channel volume would be ~8 TB): sparse sampling and convs still work."""
    shape = (5000, 5000, 5000)
    g = torch.Generator().manual_seed(11)
    centres = torch.randint(0, 4990, (400, 3), generator=g)
    blob = torch.stack(torch.meshgrid(*[torch.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    xyz = torch.unique((centres[:, None] + blob[None]).reshape(-1, 3), dim=0)
    keep = torch.rand(len(xyz), generator=g) < 0.8
    xyz = torch.cat([xyz[keep], torch.tensor([[0, 0, 0], [4999, 4999, 4999]])])
    c = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1)
    f = torch.randn(len(c), 16, dtype=DT, generator=g)
    lo, vs = torch.zeros(3, dtype=DT), 0.1
    u = torch.cat([centres[:2500 // 8].repeat(8, 1).to(DT) + torch.rand(2496, 3, generator=g, dtype=DT) * 1.5,
                   torch.tensor([[4999.0, 4999.0, 4999.0], [0.0, 0.0, 0.0], [4998.5, 4999, 4999]], dtype=DT)])
    pts = lo + u * vs
    out = sample_sparse_volume(f, c, pts, vs, lo, grid_shape=shape)
    # brute force with a Python dict
    table = {tuple(r): i for i, r in enumerate(c[:, 1:].tolist())}
    uu = (pts - lo) / vs
    want = torch.zeros_like(out)
    for m, (ux, uy, uz) in enumerate(uu.tolist()):
        bx, by, bz = math.floor(ux), math.floor(uy), math.floor(uz)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    i = table.get((bx + dx, by + dy, bz + dz))
                    if i is None:
                        continue
                    w = ((ux - bx) if dx else (1 - ux + bx)) * ((uy - by) if dy else (1 - uy + by)) \
                        * ((uz - bz) if dz else (1 - uz + bz))
                    want[m] += w * f[i]
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[-3], f[-1])
    # convolutions on the same coordinates never touch the box either
    x = SparseTensor(f, c)
    y = SparseConv3d(16, 8, stride=2).double()(SparseConv3d(16, 16).double()(x))
    assert y.num_voxels > 0 and y.coords[:, 1:].max() <= (4999 - 2) // 2


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ops_cuda_equal_cpu(dtype):
    c = random_coords((16, 16, 16), 0.2, 2, seed=12)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.manual_seed(3)
    f = torch.randn(len(c), 3, dtype=dtype)
    outs = {}
    for dev in ("cpu", "cuda"):
        ff = f.to(dev).requires_grad_(True)
        x = SparseTensor(ff, c.to(dev))
        W1 = torch.randn(27, 3, 8, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(dev)
        W2 = torch.randn(27, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(dev)
        W3 = torch.randn(27, 8, 4, dtype=dtype, generator=torch.Generator().manual_seed(2)).to(dev)
        for W in (W1, W2, W3):
            W.requires_grad_(True)
        a = sparse_conv3d(x, W1)
        b = sparse_conv3d(a, W2, stride=2)
        d = sparse_conv3d(b, W3, stride=2, transposed=True)
        loss = (d.feats ** 2).sum() + b.feats.sum()
        gs = torch.autograd.grad(loss, (ff, W1, W2, W3))
        outs[dev] = [a.coords, b.coords, d.coords, a.feats, b.feats, d.feats, *gs]
    for u, v in zip(outs["cpu"], outs["cuda"]):
        if u.dtype == torch.long:
            assert torch.equal(u, v.cpu())
        elif dtype == torch.float32:  # sums of many terms of both signs: compare relative to the tensor's scale
            err, scale = float((u - v.cpu()).abs().max()), float(u.abs().max())
            assert err <= 1e-4 * scale + 1e-6, (err, scale)
        else:
            torch.testing.assert_close(u, v.cpu(), **tol)


@pytest.mark.gpu
def test_unet_and_sampling_cuda_equal_cpu():
    torch.manual_seed(4)
    pts = torch.rand(20000, 3, dtype=DT) * torch.tensor([6.0, 6.0, 1.0], dtype=DT)
    col = torch.rand(20000, 3, dtype=DT)
    net = SparseUNet().double()
    res = {}
    for dev in ("cpu", "cuda"):
        vox = voxelize(pts.to(dev), col.to(dev), 0.1)
        n = net.to(dev)
        vol = n(vox.tensor(), cache=vox.kernel_maps)
        s = sample_volume(vol, vox, pts.to(dev)[:2000] + 0.02)
        gs = torch.autograd.grad(s.square().sum(), list(n.parameters()))
        res[dev] = [vol.feats, s, *gs]
    for u, v in zip(res["cpu"], res["cuda"]):
        torch.testing.assert_close(u, v.cpu(), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------------------------------- host reads
def test_downsample_map_same_with_flag_table_and_sorted_keys(monkeypatch):
    """The strided map's outputs are found with a flag per coarse cell (boxes up to DENSE_TABLE_CELLS) or by sorting
    the keys (larger boxes): the same coordinates, in the same order, and the same pairs."""
    import evolsplat_ns.model.sparse.kernel_map as km

    for seed, batch, rng in ((3, 1, None), (4, 2, None), (5, 1, (13, 12, 15))):
        c = random_coords((13, 11, 14), 0.25, batch, seed=seed)
        a_map, a_out, a_rng = build_downsample_map(c, 3, 2, rng)
        monkeypatch.setattr(km, "DENSE_TABLE_CELLS", 0)
        b_map, b_out, b_rng = build_downsample_map(c, 3, 2, rng)
        monkeypatch.undo()
        assert torch.equal(a_out, b_out) and a_rng == b_rng
        assert [torch.equal(x, y) for x, y in zip(a_map.pairs(), b_map.pairs())] == [True] * 3


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts what makes the host wait for a CUDA device: scalar reads (``item``/``int``/``bool``), ops whose output
    size depends on the data (``nonzero``, ``unique``, boolean indexing), and ``tolist`` (patched in by the test)."""

    SIZE_FROM_DATA = {"nonzero", "unique", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
                      "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.count = 0

    @classmethod
    def counting_tolist(cls, monkeypatch) -> "_HostReads":
        """A counter that also counts ``Tensor.tolist`` (patched for the test)."""
        mode = cls()
        orig = torch.Tensor.tolist

        def tolist(t):
            mode.count += 1
            return orig(t)

        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        return mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] or ()))
        if name == "_local_scalar_dense" or name in self.SIZE_FROM_DATA or bool_index:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_kernel_maps_are_built_with_few_host_reads(monkeypatch):
    """Issue 16: building a segment's kernel maps (first forward of the U-Net: 4 hashes, 4 submanifold and 3 strided
    maps) reads the device a bounded number of times — one read per hash and per map, the box and the output count
    of each strided map, and the (CPU-side) kernel offsets of each lookup: 21 here, where the earlier build, with
    ``nonzero`` / ``unique`` / size reads inside every map, made 106. With the maps cached there is none."""
    c = random_coords((24, 24, 24), 0.15, 1, seed=11)
    f = torch.randn(len(c), 3, dtype=DT)
    net = SparseUNet().double().eval()
    mode = _HostReads.counting_tolist(monkeypatch)
    cache = KernelMapCache()
    with torch.no_grad(), mode:
        net(SparseTensor(f, c), cache=cache)
    first = mode.count
    mode.count = 0
    with torch.no_grad(), mode:
        net(SparseTensor(f, c), cache=cache)
    assert first <= 4 + 4 + 4 + 3 * 3, first  # hashes + maps (+ CPU offsets of each submanifold lookup) + strided
    assert mode.count == 0, mode.count


def test_kernel_maps_for_the_implicit_gemm_need_no_pair_lists(monkeypatch):
    """Issue 16: the implicit-GEMM path reads a map as its neighbour table (and the inverse of a strided map), so
    building a U-Net's maps for it skips the grouped pair lists and their host read: one read per hash, the
    (CPU-side) offsets of each submanifold lookup and the box and output count of each strided map — 4 + 4 + 3 * 2
    here, against 21 when the gather path lists the pairs too (test above)."""
    c = random_coords((24, 24, 24), 0.15, 1, seed=11)
    mode = _HostReads.counting_tolist(monkeypatch)
    with torch.no_grad(), mode:
        _implicit_gemm_maps(KernelMapCache(), c)
    assert mode.count <= 4 + 4 + 3 * 2, mode.count  # listing the pairs would add one read per map (7)


def _implicit_gemm_maps(cache: KernelMapCache, coords) -> None:
    """What the implicit-GEMM U-Net builds on its first forward: the submanifold map of each of its 4 levels, the 3
    strided maps between them and their inverse tables."""
    s = 1
    for level in range(4):
        cache.submanifold(coords, s)
        if level < 3:
            down, coords, _ = cache.downsample(coords, s)
            down.inverse()
            s *= 2


@cpu_interpreter
def test_fused_kernel_maps_read_the_device_less(monkeypatch):
    """The fused maps (``KernelMapCache(fused_lookup=True)``) build the same U-Net maps as the test above with 3 host
    reads fewer: the coarse levels' hashes come with their strided maps, so only the finest one reads its extent."""
    c = random_coords((24, 24, 24), 0.15, 1, seed=11)
    counts = {}
    for fused in (False, True):
        mode = _HostReads.counting_tolist(monkeypatch)
        with torch.no_grad(), mode:
            _implicit_gemm_maps(KernelMapCache(fused_lookup=fused), c)
        counts[fused] = mode.count
        monkeypatch.undo()
    assert counts[True] <= 1 + 4 + 3 * 2 and counts[True] == counts[False] - 3, counts
