"""Exports: standard 3DGS PLY files of reconstructed segments."""
