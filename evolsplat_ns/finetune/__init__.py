"""Per-scene optimisation started from the feed-forward reconstruction: scene export, merging of the segments'
Gaussians, the ``evolsplat-ft`` model (splatfacto from given Gaussians) and the timed run."""
