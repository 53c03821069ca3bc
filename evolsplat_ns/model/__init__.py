"""EVolSplat model: sparse volume encoder (``evolsplat_ns.model.sparse``), Gaussian heads, background, renderer.

Kept free of imports so that importing one submodule does not pull in the others.
"""
