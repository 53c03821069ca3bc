"""The torch point-cloud backend: exact grid KNN, outlier removal with open3d's semantics, the same clouds and cache
entries as the CPU backends, and (GPU-marked) the CUDA path equal to the CPU path."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from layout_fixtures import write_pandaset
from sklearn.neighbors import NearestNeighbors
from test_pointcloud import PLAIN, segment_of, write_analytic_scene

from evolsplat_ns.data.dataparser import parse_scene
from evolsplat_ns.errors import ConfigError
from evolsplat_ns.pointcloud import filters, knn, plyio
from evolsplat_ns.pointcloud.cache import PointCloudCache, build_all, config_hash
from evolsplat_ns.pointcloud.generators import make_generator, prefetch_ordered
from evolsplat_ns.pointcloud.init import init_gaussians, knn_mean_distance
from evolsplat_ns.pointcloud.options import PointCloudOptions, resolve_backend

HAVE_O3D = plyio.open3d_module() is not None


def sklearn_knn(pts: np.ndarray, k: int) -> np.ndarray:
    """[N, k] distances to the k nearest points, the point itself included (scikit-learn's KD-tree)."""
    return NearestNeighbors(n_neighbors=k, algorithm="kd_tree").fit(pts).kneighbors(pts)[0]


def clouds():
    """Clouds that exercise every path of the grid search (name -> [N, 3] float64)."""
    rng = np.random.default_rng(0)
    dense = rng.normal(0, 0.05, (3000, 3))
    far = rng.uniform(-400, 400, (40, 3))  # sparse points hundreds of metres out: many grid levels
    a, r = rng.uniform(0, 2 * np.pi, 4000), rng.choice([5.0, 5.3, 5.6, 6.0, 30.0], 4000)
    scan = np.stack([np.cos(a) * r, 1.6 + rng.normal(0, 0.01, 4000), np.sin(a) * r], 1)  # LiDAR-like rings
    dup = np.repeat(rng.normal(size=(150, 3)), 3, axis=0)
    dup[:60] = dup[0]  # 60 coincident points: more than k of them for every k below
    return {
        "uniform": rng.uniform(-1, 1, (2000, 3)),
        "clustered+far": np.concatenate([dense, far]),
        "lidar rings": scan,
        "plane": np.c_[rng.uniform(0, 10, (1500, 2)), np.zeros(1500)],
        "duplicates": dup,
        "tiny": rng.normal(size=(6, 3)),
        "two": np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]]),
    }


# ----------------------------------------------------------------------------------------------------------------
# KNN
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(clouds()))
@pytest.mark.parametrize("k", [1, 4, 21, 35])
def test_torch_knn_equals_sklearn_exactly(name, k):
    pts = clouds()[name]
    k = min(k, len(pts))  # k == N: every point is a neighbour of every point
    ref = sklearn_knn(pts, k)
    np.testing.assert_array_equal(knn.knn_distances(pts, k).numpy(), ref)
    # tiny chunks: many chunks per level, and a chunk of one point with more candidates than the budget
    np.testing.assert_array_equal(knn.knn_distances(torch.from_numpy(pts), k, max_entries=64).numpy(), ref)
    if k > 1:
        np.testing.assert_allclose(knn.knn_mean_distances(pts, k - 1, skip_self=True).numpy(),
                                   ref[:, 1:].mean(1), rtol=1e-15, atol=0)


def test_knn_rejects_k_above_n_and_handles_empty():
    with pytest.raises(ValueError, match="exceeds"):
        knn.knn_distances(np.zeros((3, 3)), 4)
    with pytest.raises(ValueError, match="k must be"):
        knn.knn_distances(np.zeros((3, 3)), 0)
    assert knn.knn_distances(np.zeros((0, 3)), 3).shape == (0, 3)
    same = knn.knn_distances(np.ones((5, 3)), 5)  # every point coincides
    assert same.shape == (5, 5) and not same.any()


@pytest.mark.parametrize("name", ["uniform", "clustered+far", "duplicates", "tiny", "two"])
def test_initial_scales_same_for_both_backends(name):
    pts = clouds()[name].astype(np.float32)  # clouds are float32 in the cache
    a = knn_mean_distance(pts, backend="sklearn")
    b = knn_mean_distance(pts, backend="torch")
    np.testing.assert_allclose(b, a, rtol=1e-15, atol=0)
    assert len(knn_mean_distance(pts[:1], backend="torch")) == 1
    ga = init_gaussians(pts, np.zeros_like(pts), knn_backend="sklearn")
    gb = init_gaussians(pts, np.zeros_like(pts), knn_backend="torch", keys=("log_scales", "quats"))
    assert set(gb) == {"log_scales", "quats"}
    assert torch.equal(ga["log_scales"], gb["log_scales"]) and torch.equal(ga["quats"], gb["quats"])


# ----------------------------------------------------------------------------------------------------------------
# statistical outlier removal
# ----------------------------------------------------------------------------------------------------------------


def outlier_cloud(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = np.concatenate([rng.normal(0, 0.5, (1500, 3)), rng.normal(0, 0.5, (700, 3)) + [6.0, 0, 0],
                          rng.uniform(-15, 15, (30, 3))])
    pts[100:400] = pts[100]  # 300 coincident points: their statistic is 0 (not positive)
    return pts


def open3d_definition(pts: np.ndarray, nb: int, std_ratio: float) -> np.ndarray:
    """open3d's arithmetic written out: sums over the positive statistics, divided by all N (and N - 1)."""
    avg = sklearn_knn(pts, nb).mean(1)
    n = len(pts)
    mean = avg[avg > 0].sum() / n
    std = np.sqrt(((avg[avg > 0] - mean) ** 2).sum() / (n - 1))
    return (avg > 0) & (avg < mean + std_ratio * std)


@pytest.mark.parametrize("nb,std", [(20, 2.0), (35, 1.5), (8, 0.5)])
def test_outlier_removal_backends_agree_with_open3d(nb, std):
    pts = outlier_cloud()
    want = open3d_definition(pts, nb, std)
    for backend in ("sklearn", "torch") + (("open3d",) if HAVE_O3D else ()):
        got = filters.statistical_outlier_mask(pts, nb, std, backend=backend)
        np.testing.assert_array_equal(got, want, err_msg=backend)
    got_t = filters.statistical_outlier_mask(torch.from_numpy(pts), nb, std, backend="torch")
    assert isinstance(got_t, torch.Tensor) and np.array_equal(got_t.numpy(), want)
    assert (~want[100:400]).all() and 0 < (~want).sum() - 300 < 150  # the coincident points go, as in open3d


def test_outlier_statistic_divides_by_all_points():
    """open3d's mean and deviation divide by every point, also those with a zero statistic (>= nb coincident
    points); dividing by the positive ones only (what the scikit-learn fallback did) keeps other points here."""
    pts, nb, std = outlier_cloud(), 8, 0.5
    want = open3d_definition(pts, nb, std)
    avg = sklearn_knn(pts, nb).mean(1)
    pos = avg[avg > 0]
    assert not np.array_equal((avg > 0) & (avg < pos.mean() + std * pos.std(ddof=1)), want)
    if HAVE_O3D:
        o3d = plyio.open3d_module()
        _, ind = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts)).remove_statistical_outlier(nb, std)
        np.testing.assert_array_equal(np.isin(np.arange(len(pts)), np.asarray(ind)), want)
    np.testing.assert_array_equal(filters.statistical_outlier_mask(pts, nb, std, backend="sklearn"), want)


def test_outlier_removal_on_tiny_clouds_keeps_everything():
    pts = np.random.default_rng(0).normal(size=(20, 3))
    for backend in ("sklearn", "torch") + (("open3d",) if HAVE_O3D else ()):
        assert filters.statistical_outlier_mask(pts, 20, 0.1, backend=backend).all()


def test_postprocess_same_on_tensors_and_numpy():
    pts = outlier_cloud().astype(np.float32)
    cols = np.random.default_rng(3).uniform(0, 1, pts.shape).astype(np.float32)
    opts = PointCloudOptions()
    crop, inner = np.array([[-12.0] * 3, [12.0] * 3]), np.array([[-3.0] * 3, [3.0] * 3])
    p0, c0 = filters.postprocess(pts, cols, opts, crop, inner, backend="sklearn")
    p1, c1 = filters.postprocess(torch.from_numpy(pts), torch.from_numpy(cols), opts, crop, inner, backend="torch")
    assert isinstance(p0, np.ndarray) and isinstance(p1, torch.Tensor)
    np.testing.assert_array_equal(p1.numpy(), p0)
    np.testing.assert_array_equal(c1.numpy(), c0)
    assert 0 < len(p0) < len(pts)


# ----------------------------------------------------------------------------------------------------------------
# backends: the same cloud, the same cache entry
# ----------------------------------------------------------------------------------------------------------------

BACKENDS = ("sklearn", "torch") + (("open3d",) if HAVE_O3D else ())


def test_backend_selection(monkeypatch):
    assert resolve_backend(PointCloudOptions(backend="torch"), "cpu") == ("torch", torch.device("cpu"))
    assert resolve_backend(PointCloudOptions(backend="sklearn"), "cuda")[0] == "sklearn"
    name, dev = resolve_backend(PointCloudOptions(), "cpu")  # auto on the CPU: today's CPU path
    assert name == ("open3d" if HAVE_O3D else "sklearn") and dev.type == "cpu"
    monkeypatch.setattr(plyio, "open3d_module", lambda: None)
    assert resolve_backend(PointCloudOptions(), "cpu")[0] == "sklearn"
    with pytest.raises(ConfigError, match="open3d"):
        resolve_backend(PointCloudOptions(backend="open3d"))
    with pytest.raises(ConfigError, match="backend"):
        PointCloudOptions(backend="faiss").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="device"):
        PointCloudOptions(device="gpu0").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_backend(PointCloudOptions(backend="torch", device="cuda"))
        assert resolve_backend(PointCloudOptions())[1].type == "cpu"


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    return parse_scene(write_analytic_scene(tmp_path_factory.mktemp("street") / "scene_000"), 0)


@pytest.mark.parametrize("generator", ["depth", "lidar"])
def test_every_backend_builds_the_same_cloud_and_cache_entry(street, generator, tmp_path):
    seg = segment_of(street, frames=[0, 1, 2, 3])
    if generator == "lidar":  # LiDAR-like points from the depth maps (every second pixel of every image)
        sweeps = {t: make_generator(PointCloudOptions(**PLAIN, filter_sky=False, depth_consistency=False, downscale=2))
                  .generate_pointcloud(street, segment_of(street, frames=[t]))[0] for t in range(4)}
        street.metadata["lidar_loader"] = lambda t: sweeps[t]
    # tight boxes so that the outer points are few and sparse, and every stage (crop, split, outliers) acts
    base = PointCloudOptions(generator=generator, crop_aabb=(-20, -12, -5, 20, 5, 40),
                             input_aabb=(-6, -12, -5, 6, 5, 12), nb_neighbors_inside=12, nb_neighbors_outside=6)
    out = {}
    for b in BACKENDS:
        g = make_generator(base.replace(backend=b))
        pc = PointCloudCache(tmp_path / b).get(g, street, seg)
        out[b] = (pc, pc.knn_distance(), PointCloudCache(tmp_path / b).path_for(g, street, seg))
        assert g.last_report.backend == b and g.last_report.stages.get("outlier removal", 0) > 0
    ref_pc, ref_knn, ref_path = out["sklearn"]
    assert len(ref_pc.points) > 100
    for b, (pc, d, path) in out.items():
        np.testing.assert_array_equal(pc.points, ref_pc.points, err_msg=b)
        np.testing.assert_array_equal(pc.colours, ref_pc.colours, err_msg=b)
        np.testing.assert_allclose(d, ref_knn, rtol=1e-15, atol=0, err_msg=b)
        assert path.name == ref_path.name  # the backend is not in the cache key
    # an entry written by one backend is a hit for another
    hit = PointCloudCache(tmp_path / "sklearn").get(make_generator(base.replace(backend="torch")), street, seg)
    assert hit.from_cache and hit.knn_backend == "torch"


def test_cache_key_ignores_backend_and_device():
    a = PointCloudOptions()
    assert config_hash(a.to_key()) == config_hash(a.replace(backend="torch", device="cuda:1").to_key())
    assert "backend" not in a.to_key() and "device" not in a.to_key()
    assert config_hash(a.to_key()) != config_hash(a.replace(every_k_inside=3).to_key())


def test_lidar_cloud_from_pandaset_sweeps_read_in_threads(tmp_path, monkeypatch):
    """Real gzipped pickles read by the reader threads: the cloud equals the one read by a single thread."""
    from evolsplat_ns.data.layouts import LayoutOptions, load_layout_scenes
    from evolsplat_ns.pointcloud import generators

    write_pandaset(tmp_path / "001", num_frames=6, cams=["front", "front_left"])
    scene = load_layout_scenes(tmp_path, LayoutOptions(lidar_cache_dir=tmp_path / "c"))[0]
    seg = segment_of(scene)
    opts = PointCloudOptions(generator="lidar", **PLAIN)
    many, _ = make_generator(opts.replace(backend="torch")).generate_pointcloud(scene, seg)
    monkeypatch.setattr(generators, "READ_WORKERS", 1)
    one, _ = make_generator(opts.replace(backend="sklearn")).generate_pointcloud(scene, seg)
    assert len(one) > 100
    np.testing.assert_array_equal(many, one)


def test_lidar_colouring_rejects_an_image_of_another_size(tmp_path):
    """Pixels are looked up by flat index (on the GPU an out-of-range one is a device assert): a wrong-sized image
    is one error line naming the file."""
    from PIL import Image

    from evolsplat_ns.errors import DataValidationError

    scene = parse_scene(write_analytic_scene(tmp_path / "s", num_frames=2), 0)
    scene.metadata["lidar_loader"] = lambda t: np.array([[0.0, 1.5, 8.0]])
    bad = scene.image(1, 0).image_path
    Image.new("RGB", (17, 9)).save(bad)
    with pytest.raises(DataValidationError, match=rf"{bad.name}.*image.*40x30.*got 17x9"):
        make_generator(PointCloudOptions(generator="lidar", **PLAIN)).generate_pointcloud(scene, segment_of(scene))


def test_prefetch_keeps_order_bounds_memory_and_raises():
    live, peak, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.002 * ((7 * i) % 5))  # finish out of order
        return i

    out = []
    for x in prefetch_ordered(work, range(40), workers=4, ahead=6):
        out.append(x)
        with lock:
            live[0] -= 1
    assert out == list(range(40)) and peak[0] <= 6

    def bad(i):
        if i == 5:
            raise ValueError("frame 5 is broken")
        return i

    got = []
    with pytest.raises(ValueError, match="frame 5"):
        for x in prefetch_ordered(bad, range(20), workers=3):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]


def test_build_all_writes_clouds_and_scales(street, tmp_path):
    g = make_generator(PointCloudOptions(**PLAIN))
    cache = PointCloudCache(tmp_path)
    items = [(street, segment_of(street, frames=f, segment_id=i), None) for i, f in enumerate(([0, 1], [2, 3]))]
    assert not any(cache.is_built(g, *it) for it in items)
    res = build_all(items, g, cache, quiet=True)
    assert all(cache.is_built(g, *it) for it in items) and all(not r.from_cache for r in res)
    assert all(r.path.with_suffix(".knn.npy").exists() for r in res)
    assert all(r.from_cache for r in build_all(items, g, cache, quiet=True, with_knn=False))


# ----------------------------------------------------------------------------------------------------------------
# CUDA (run on the GPU machine)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_path_equals_cpu_path(street, tmp_path):
    for name, pts in clouds().items():
        for k in (4, 35):
            k = min(k, len(pts))
            np.testing.assert_array_equal(knn.knn_distances(pts, k, device="cuda").cpu().numpy(),
                                          knn.knn_distances(pts, k).numpy(), err_msg=name)
    pts = outlier_cloud()
    for nb, std in ((20, 2.0), (35, 1.5)):
        np.testing.assert_array_equal(
            filters.statistical_outlier_mask(torch.from_numpy(pts).cuda(), nb, std, backend="auto").cpu().numpy(),
            filters.statistical_outlier_mask(pts, nb, std, backend="sklearn"))
    seg = segment_of(street, frames=[0, 1, 2, 3])
    for generator in ("depth", "lidar"):
        if generator == "lidar":
            sweeps = {t: make_generator(PointCloudOptions(**PLAIN, filter_sky=False, depth_consistency=False))
                      .generate_pointcloud(street, segment_of(street, frames=[t]))[0] for t in range(4)}
            street.metadata["lidar_loader"] = lambda t: sweeps[t]
        opts = PointCloudOptions(generator=generator, nb_neighbors_inside=12, nb_neighbors_outside=6)
        g_gpu = make_generator(opts, device="cuda")  # auto on the model's CUDA device: the torch backend
        assert g_gpu.backend()[0] == "torch"
        gpu = PointCloudCache(tmp_path / f"gpu-{generator}").get(g_gpu, street, seg)
        cpu = PointCloudCache(tmp_path / f"cpu-{generator}").get(make_generator(opts, device="cpu"), street, seg)
        np.testing.assert_array_equal(gpu.points, cpu.points)
        np.testing.assert_array_equal(gpu.colours, cpu.colours)
        np.testing.assert_allclose(gpu.knn_distance(), cpu.knn_distance(), rtol=1e-15, atol=0)
    big = np.random.default_rng(0).normal(0, 5, (300_000, 3)).astype(np.float32)  # several chunks on the GPU
    np.testing.assert_allclose(knn_mean_distance(big, device="cuda"), knn_mean_distance(big, backend="sklearn"),
                               rtol=1e-15, atol=0)
