"""CacheQuant for diffusion U-Nets (issue 8): DeepCache-style cached U-Net runtime,
cache schedules (uniform, DeepCache non-uniform, DPS dynamic programme), decoupled error
correction, and the FID protocol of the benchmark (:mod:`bitpress.cache.fid`).
"""
